"""``srun`` on the test SLURM cluster (tests/slurm/cluster.sh): two launch.py tasks find each other
from SLURM's environment alone, with no flags, and train what one process trains.

Each task gets one CPU and one XLA device (two in all); the reference is one process on one
device. Batch norm statistics and the loss are means over the global batch, so only summation
order may differ.
"""

import subprocess

import pytest
from conftest import REPO, write_synthetic_medmnist
from helpers import config, final_params, launch_cmd, launch_env, override_flags, rel_diff, tail

from medjax.train import loop

pytestmark = pytest.mark.slurm

STEPS = 6
OVERRIDES = {"train.steps": STEPS, "eval.every_steps": 3}


def test_srun_two_tasks_train_as_one_process_and_name_slurm(slurm_conf, tmp_path):
  data = write_synthetic_medmnist(str(tmp_path))
  workdir = str(tmp_path / "srun")
  env = dict(launch_env(1), SLURM_CONF=slurm_conf)  # one XLA device per task
  cmd = ["srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1", "--time=10",
         *launch_cmd(workdir, override_flags({"data.dir": data, **OVERRIDES}))]
  p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  out = p.stdout + p.stderr
  assert p.returncode == 0, tail(out, 40)

  starts = sorted(ln for ln in p.stdout.splitlines() if ln.startswith("cluster: "))
  assert len(starts) == 2, tail(out, 40)
  for i, line in enumerate(starts):
    assert line.startswith("cluster: SLURM job "), line
    assert f"process {i} of 2; devices: 1 local of 2 (cpu" in line, line
  assert p.stdout.count("done: ") == 1  # process 0 reports

  ref = str(tmp_path / "one")
  loop.train_and_evaluate(config(data, **OVERRIDES), ref)
  mine, theirs = final_params(workdir), final_params(ref)
  assert int(mine["step"]) == int(theirs["step"]) == STEPS
  for part in ("params", "batch_stats"):
    diff = rel_diff(mine[part], theirs[part])
    assert diff <= 1e-5, f"{part}: relative difference {diff:.2e}\n{tail(out)}"
