"""Open MPI's ``mpirun``: two launch.py processes find each other from Open MPI 4's environment
alone (``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_*``), with no flags, and train what one
process trains.

The Open MPI twin of tests/slurm/test_srun.py: one XLA device per process (two in all) against
the same one-process, one-device run (the ``one_process_run`` fixture), parameters within 1e-5
relative. Skipped where Open MPI 4 is not installed (the ``mpirun`` fixture says why).
"""

import os
import signal
import subprocess

import pytest
from conftest import REPO
from helpers import (
  MULTIPROCESS_OVERRIDES,
  assert_trains_as_one_process,
  launch_cmd,
  launch_env,
  override_flags,
  tail,
)

pytestmark = pytest.mark.mpi


def test_mpirun_two_processes_train_as_one_process_and_name_open_mpi(mpirun, one_process_run,
                                                                     tmp_path):
  workdir = str(tmp_path / "mpirun")
  flags = override_flags({"data.dir": one_process_run["data"], **MULTIPROCESS_OVERRIDES})
  cmd = [*mpirun, "-n", "2", *launch_cmd(workdir, flags)]
  # Its own process group: on a timeout, mpirun and both ranks go (mpirun alone killed would
  # leave ranks blocked in a collective).
  p = subprocess.Popen(cmd, env=launch_env(1), cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    stdout, stderr = p.communicate(timeout=180)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    stdout, stderr = p.communicate()
    raise AssertionError(f"mpirun ran past 180 s:\n{tail(stdout + stderr, 40)}") from None
  out = stdout + stderr
  assert p.returncode == 0, tail(out, 40)
  assert_trains_as_one_process(stdout, out, workdir, one_process_run["workdir"], "Open MPI;")
