"""Tests of medjax/host.py: XLA's device count and glibc's handling of freed memory."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from medjax import host
from medjax.ops.cpu import onednn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_use_every_core_sets_one_device_per_core_for_xla_convolutions(monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # pinned to one core (srun)
  host.use_every_core()
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                     "--xla_force_host_platform_device_count=1")


def test_use_every_core_keeps_one_device_for_onednn_convolutions(monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: True)  # they thread over every core
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  host.use_every_core()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"


@pytest.mark.parametrize("platforms,plugin", [("cuda", False), ("tpu,cpu", False), ("", True)])
def test_use_every_core_builds_nothing_where_jax_runs_on_an_accelerator(monkeypatch, platforms,
                                                                         plugin):
  """JAX_PLATFORMS naming an accelerator first, or (unset) an accelerator plugin installed: the
  CPU kernels are not built, and the CPU backend gets one device per core as without them."""
  def no_build():
    raise AssertionError("built the CPU kernels for a process that does not run on the CPU")

  monkeypatch.setattr(onednn, "available", no_build)
  monkeypatch.setattr(host, "_accelerator_plugin_installed", lambda: plugin)
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv("XLA_FLAGS", "")
  host.use_every_core()
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={os.cpu_count()}"
  assert not host.cpu_kernels_available({"JAX_PLATFORMS": "cuda"})


def test_cpu_kernels_available_asks_the_build_where_jax_runs_on_the_cpu(monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: True)
  monkeypatch.setattr(host, "_accelerator_plugin_installed", lambda: True)
  assert host.cpu_kernels_available({"JAX_PLATFORMS": "cpu"})
  assert not host.cpu_kernels_available({})  # a plugin, and JAX_PLATFORMS unset
  monkeypatch.setattr(host, "_accelerator_plugin_installed", lambda: False)
  assert host.cpu_kernels_available({})


def test_prepare_does_both(monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MEDJAX_KEEP_FREED_MEMORY", "0")  # this process's allocator stays as it is
  assert host.prepare() is False
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={os.cpu_count()}"


def test_use_every_core_keeps_an_explicit_count(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
  host.use_every_core()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"


# A worker thread (as XLA's are) allocates, touches and frees 100 MB three times; prints the page
# faults of the last round. Freed memory that went back to the kernel faults in again (25,600
# pages of 4 KiB); memory kept by the process does not.
_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys, threading
    sys.path.insert(0, sys.argv[1])
    from medjax import host
    if sys.argv[2] == "keep":
      assert host.keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 100 * 2**20
    faults = []
    def work():  # plain malloc/free, as XLA's allocator (numpy asks for huge pages)
      for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(faults[-1])
""")


def _last_round_faults(mode: str) -> int:
  env = {k: v for k, v in os.environ.items()
         if k != "MEDJAX_KEEP_FREED_MEMORY" and not k.startswith("MALLOC_")}
  out = subprocess.run([sys.executable, "-c", _FAULTS, REPO, mode], capture_output=True,
                       text=True, check=True, timeout=60, env=env)
  return int(out.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings are glibc's")
def test_keep_freed_memory_stops_refaulting_large_blocks():
  assert _last_round_faults("default") > 20_000  # the control: glibc unmaps the block on free
  assert _last_round_faults("keep") < 1_000


# Environments as the launchers set them (SLURM 22.05's srun and sbatch, Open MPI 4 and 5).
_SRUN = {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[001-002]",
         "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
_SBATCH = {"SLURM_JOB_ID": "12", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODELIST": "node[001-002]"}


@pytest.mark.parametrize("env, name, method, processes, distributed", [
    (_SRUN, "SLURM job 12, step 0", "slurm", 4, True),
    (dict(_SRUN, SLURM_NTASKS="1"), "SLURM job 12, step 0", "slurm", 1, False),
    # A batch script's own process is one process, whatever its job asked for: srun starts more.
    (_SBATCH, "SLURM job 12 outside srun (one process)", None, 1, False),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "Open MPI", "ompi", 2,
     True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS", "env", None, True),
    ({}, "none found", None, 1, False),
])
def test_find_cluster_names_the_environment(env, name, method, processes, distributed):
  cluster = host.find_cluster(env)
  assert (cluster.name, cluster.method, cluster.processes) == (name, method, processes)
  assert cluster.distributed == distributed


def test_find_cluster_refuses_open_mpi_5_with_the_fix():
  # Open MPI 5 (PRRTE) sets the rank and size but not the ORTE address JAX reads.
  env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0"}
  with pytest.raises(host.ClusterError, match="--num_processes=\\$OMPI_COMM_WORLD_SIZE"):
    host.find_cluster(env)


def test_jax_detects_slurm_as_find_cluster_does(monkeypatch):
  """JAX's own SLURM detection, which start_distributed hands over to, agrees with ours on what
  srun sets: process 0's host, the task count and this task's index."""
  from jax._src import clusters

  for k, v in _SRUN.items():
    monkeypatch.setenv(k, v)
  assert clusters.SlurmCluster.is_env_present()
  address, count, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, "slurm", None)
  assert (address.split(":")[0], count, index, local) == ("node001", 4, 1, [1])
