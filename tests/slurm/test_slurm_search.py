"""An Optuna search (medjax/sweep/search.py) drawn from by a SLURM array task and a local command
at once, on the test SLURM cluster (tests/slurm/cluster.sh): one study, one leaderboard."""

import csv
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, write_synthetic_medmnist
from helpers import LAUNCH, tail


@pytest.mark.slurm
def test_slurm_and_local_workers_share_one_study(slurm_conf, tmp_path):
  data = write_synthetic_medmnist(str(tmp_path))
  config_file = tmp_path / "search_config.py"
  config_file.write_text(textwrap.dedent(f'''\
      from configs import pneumoniamnist_resnet18


      def get_config(arg=None):
        c = pneumoniamnist_resnet18.get_config("runlocal")
        c.data.dir = {data!r}
        return c


      def get_sweep(arg=None):
        return {{"search": {{"space": {{"optim.lr": [1e-3, 3e-3]}}, "sampler": "grid",
                             "n_trials": 2, "pruner": "median"}}}}
  '''))
  workdir = str(tmp_path / "search")
  env = dict(os.environ, SLURM_CONF=slurm_conf)
  cmd = [sys.executable, LAUNCH, f"--config={config_file}", f"--workdir={workdir}", "--sweep"]
  p = subprocess.run(cmd + ["--sweep_backend=slurm", "--slurm_cpus=1"], env=env, cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, tail(p.stdout + p.stderr)
  job = re.search(r"as job array (\d+)", p.stdout)[1]
  # The array task asks first (trial 0); this command then asks the other.
  deadline = time.monotonic() + 120
  while not os.path.isdir(os.path.join(workdir, "t000_lr=0.001")):
    assert time.monotonic() < deadline, "the SLURM worker asked no trial"
    time.sleep(0.2)
  local = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert local.returncode == 0, tail(local.stdout + local.stderr)
  assert "start: t001_lr=0.003" in local.stdout, local.stdout
  while subprocess.run(["squeue", "--noheader", f"--jobs={job}"], env=env, capture_output=True,
                       text=True).stdout.strip():
    assert time.monotonic() < deadline + 300, "the SLURM worker did not end"
    time.sleep(0.5)
  with open(os.path.join(workdir, "slurm", f"{job}_0.out")) as f:
    out = f.read()
  assert "start: t000_lr=0.001" in out and "t001" not in out.split("search: 2 trials")[0], out
  with open(os.path.join(workdir, "leaderboard.csv")) as f:
    rows = list(csv.DictReader(f))
  assert sorted((r["member"], r["status"]) for r in rows) == [
      ("t000_lr=0.001", "done"), ("t001_lr=0.003", "done")]
