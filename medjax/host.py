"""Set-up of the host process, done once before JAX starts: every CPU core a device, memory kept,
and the cluster it runs in (SLURM, Open MPI, a TPU pod), whose processes join one JAX run.

The first two must run before JAX creates its CPU client (its first array or device query): the
device count is read from ``XLA_FLAGS`` then, and glibc binds each XLA worker thread to a malloc
arena when that thread first allocates.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import platform
from typing import Mapping

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def use_every_core() -> None:
  """Makes the CPU backend's convolutions use every core, unless ``XLA_FLAGS`` sets a device count.

  Where medjax's CPU kernels run (`cpu_kernels_available`), each call is threaded over all of
  this process's cores, so XLA keeps its one CPU device. Without them, XLA:CPU runs each
  convolution on one thread, and the data-parallel mesh needs one host device per core.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  if not cpu_kernels_available():
    # The cores this process may run on (srun and taskset pin a task to its share), not the host's.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                               f"{cores or 1}").strip()


def cpu_kernels_available(env: Mapping[str, str] | None = None) -> bool:
  """Whether a process with environment ``env`` (default: this one's) runs medjax's CPU kernels
  (``medjax.ops.cpu``), which thread each call over every core, so one CPU device is enough.

  Compiles them on the first call (seconds, once, cached), but only where JAX will run on the
  CPU. That is judged without starting JAX, whose device count must still be settable by
  ``XLA_FLAGS``: the first entry of ``JAX_PLATFORMS`` where it is set, else whether an
  accelerator plugin (CUDA, ROCm, TPU) is installed. A host with a plugin but no accelerator is
  thus treated as an accelerator host (False: one device per core); should its JAX then run on
  the CPU, ``medjax.ops`` still builds and uses the kernels, threaded over each device's share.
  """
  if not _jax_runs_on_cpu(os.environ if env is None else env):
    return False
  from medjax.ops.cpu import onednn  # imports JAX, which is fine: its CPU client starts later
  return onednn.available()


def _jax_runs_on_cpu(env: Mapping[str, str]) -> bool:
  """Whether JAX's default backend will be the CPU, as far as can be told without starting it."""
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return not _accelerator_plugin_installed()


def _accelerator_plugin_installed() -> bool:
  """Whether JAX would find a plugin for an accelerator (``jax_plugins``, or libtpu)."""
  return bool(importlib.metadata.entry_points(group="jax_plugins")
              or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory in the process instead of returning it to the kernel.

  XLA:CPU allocates each execution's temporaries (tens to hundreds of MB) with ``malloc`` from
  its worker threads and frees them when the execution ends. glibc serves such a block with a
  fresh ``mmap`` (a thread's arena cannot hold more than 64 MB, and blocks over 32 MB are mapped
  anyway) and unmaps it on free, so every execution page-faults all of it in again
  (``docs/performance-kernels.md``). One arena, no mapped blocks and no trimming keep the memory
  for the next call. The cost: the process keeps its peak heap until it exits, and all threads
  share one malloc lock.

  ``MEDJAX_KEEP_FREED_MEMORY=0`` in the environment turns it off.

  Returns:
    True where glibc took the settings; False when turned off or elsewhere (other C libraries),
    changing nothing.
  """
  if os.environ.get("MEDJAX_KEEP_FREED_MEMORY", "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (AttributeError, OSError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(param, value) == 1 for param, value in settings)


def prepare() -> bool:
  """Both of the above, as ``launch.py`` and the benchmarks start; returns whether freed memory
  is kept."""
  kept = keep_freed_memory()  # first: before any thread of JAX's or oneDNN's allocates
  use_every_core()
  return kept


# The clusters JAX's own detection (jax._src.clusters, what ``jax.distributed.initialize()`` uses)
# is trusted with here, by its ``cluster_detection_method`` name, in JAX's order. Left out: its
# Kubernetes detection (any pod with the ``kubernetes`` package, one process or not) and mpi4py
# (opt-in in JAX too).
_JAX_CLUSTERS = {"ompi": "Open MPI", "slurm": "SLURM", "gketpu": "TPU pod (GKE)",
                 "gcetpu": "TPU pod"}


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process runs, as found from its environment before JAX starts.

  Attributes:
    name: for people, e.g. ``"SLURM job 12, step 0"``, ``"none found"``.
    method: JAX's ``cluster_detection_method`` for it; None where JAX is not asked to detect.
    processes: the processes of the run, where known before JAX starts (None on TPU pods, where
      JAX asks the metadata server).
  """
  name: str
  method: str | None = None
  processes: int | None = 1

  @property
  def distributed(self) -> bool:
    """Whether ``jax.distributed.initialize`` joins this process to others."""
    return self.method is not None and self.processes != 1


def find_cluster(env: Mapping[str, str] | None = None) -> Cluster:
  """The cluster environment of a process with environment ``env`` (default: this one's; TPU pods
  are looked for only then, as JAX asks the machine).

  SLURM is found inside a job step (``srun`` sets ``SLURM_STEP_NODELIST``); a batch script's own
  process is one process of its job. Open MPI is found under ``mpirun`` of Open MPI 4 and older;
  Open MPI 5 sets no ``OMPI_MCA_orte_hnp_uri``, from which JAX takes the coordinator's address,
  and is refused with the fix (`ClusterError`). ``JAX_COORDINATOR_ADDRESS`` gives process 0's
  address to a cluster, or alone asks JAX for the rest.
  """
  tpu = env is None
  env = os.environ if env is None else env
  if "OMPI_MCA_orte_hnp_uri" in env:
    return Cluster(_JAX_CLUSTERS["ompi"], "ompi", int(env.get("OMPI_COMM_WORLD_SIZE", "1")))
  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                            "SLURM_PROCID", "SLURM_LOCALID")):
    return Cluster(f"SLURM job {env['SLURM_JOB_ID']}, step {env.get('SLURM_STEP_ID', '?')}",
                   "slurm", int(env["SLURM_NTASKS"]))
  for method in ("gketpu", "gcetpu"):
    if tpu and _jax_cluster_present(method):
      return Cluster(_JAX_CLUSTERS[method], method, None)
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    raise ClusterError(
        f"mpirun started {env['OMPI_COMM_WORLD_SIZE']} processes, but JAX finds no Open MPI 4 "
        "(OMPI_MCA_orte_hnp_uri) to take process 0's address from: run "
        "mpirun ... bash -c 'python launch.py ... --coordinator=<first host>:<port> "
        "--num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK'")
  if "JAX_COORDINATOR_ADDRESS" in env:
    return Cluster("JAX_COORDINATOR_ADDRESS", "env", None)
  if "SLURM_JOB_ID" in env:  # a batch script, or salloc's shell: no step, one process
    return Cluster(f"SLURM job {env['SLURM_JOB_ID']} outside srun (one process)")
  return Cluster("none found")


class ClusterError(RuntimeError):
  """A cluster whose processes cannot be joined as found; the message says what to do."""


def _jax_cluster_present(method: str) -> bool:
  from jax._src import clusters  # JAX's detection; starts no backend

  return any(c.name == method and c.is_env_present() for c in clusters.ClusterEnv._cluster_types)


def start_distributed(cluster: Cluster, coordinator: str | None = None,
                      num_processes: int | None = None, process_id: int | None = None) -> None:
  """Joins this process to the others of its run, where there are others.

  Explicit ``coordinator``/``num_processes``/``process_id`` (launch.py's flags) win over the
  environment. Otherwise JAX's detection of ``cluster.method`` supplies them (on SLURM: process
  0's host and a port from the job id, ``SLURM_NTASKS``, ``SLURM_PROCID``, and, for GPUs,
  ``SLURM_LOCALID`` as the one GPU of the process; ``JAX_LOCAL_DEVICE_IDS`` overrides that).
  Collectives between CPU processes go through gloo (TCP); GPUs use NCCL on their own.
  """
  import jax

  explicit = coordinator is not None or num_processes is not None
  if not explicit and not cluster.distributed:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif cluster.method == "env":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(cluster_detection_method=cluster.method)


def start_line(cluster: Cluster, explicit: bool = False) -> str:
  """The line launch.py prints at start: the cluster found, this process, the devices."""
  import jax

  where = "--coordinator flags" if explicit else cluster.name
  devices = jax.local_devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"cluster: {where}; process {jax.process_index()} of {jax.process_count()}; "
          f"devices: {len(devices)} local of {jax.device_count()} "
          f"({jax.default_backend()}: {', '.join(kinds)})")
