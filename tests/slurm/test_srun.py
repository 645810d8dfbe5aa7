"""``srun`` on the test SLURM cluster (tests/slurm/cluster.sh): two launch.py tasks find each other
from SLURM's environment alone, with no flags, and train what one process trains.

Each task gets one CPU and one XLA device (two in all); the reference is one process on one
device (the ``one_process_run`` fixture, shared with tests/test_mpirun.py). Batch norm statistics
and the loss are means over the global batch, so only summation order may differ.
"""

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

pytestmark = pytest.mark.slurm


def test_srun_two_tasks_train_as_one_process_and_name_slurm(slurm_conf, one_process_run,
                                                            tmp_path):
  workdir = str(tmp_path / "srun")
  env = dict(launch_env(1), SLURM_CONF=slurm_conf)  # one XLA device per task
  flags = override_flags({"data.dir": one_process_run["data"], **MULTIPROCESS_OVERRIDES})
  cmd = ["srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1", "--time=10",
         *launch_cmd(workdir, flags)]
  p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  out = p.stdout + p.stderr
  assert p.returncode == 0, tail(out, 40)
  assert_trains_as_one_process(p.stdout, out, workdir, one_process_run["workdir"], "SLURM job ")
