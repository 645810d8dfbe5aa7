"""``launch.py --sweep --sweep_backend=slurm`` on the test SLURM cluster (tests/slurm/cluster.sh).

One sweep of four members, one CPU each (two run at once on the two-CPU node), made once and read
by the tests below: member 1 is cancelled mid-run with ``scancel`` and resubmitted by running the
submitting command again; member 3 is requeued mid-run with ``scontrol requeue`` (as SLURM
preempts) and comes back by itself. Members 2 and 3 have the same config, so member 2 is the
uninterrupted reference of member 3.
"""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from conftest import REPO, computed_once, write_synthetic_medmnist
from helpers import LAUNCH, final_params, tail

from medjax import sweep
from medjax.sweep import slurm

STEPS = 40
MEMBERS = [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}, {"optim.lr": 1e-2}, {"optim.lr": 1e-2}]
NAMES = ["m00_lr=0.001", "m01_lr=0.003", "m02_lr=0.01", "m03_lr=0.01"]
TIMEOUT_S = 300


def _cli(config_file, workdir, *flags, env):
  """launch.py with the sweep's config and workdir; returns ``(exit status, stdout + stderr)``."""
  p = subprocess.run([sys.executable, LAUNCH, f"--config={config_file}", f"--workdir={workdir}",
                      *flags], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  return p.returncode, p.stdout + p.stderr


def _slurm(*cmd, env):
  return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=True).stdout


def _steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max([json.loads(ln).get("step", 0) for ln in f if ln.strip().endswith("}")] or [0])


def _wait(what, condition, timeout=TIMEOUT_S):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def _active(job, env):
  """The tasks of array ``job`` SLURM still holds (pending, running, requeued)."""
  out = _slurm("squeue", "--noheader", "--array", f"--jobs={job}", "--format=%K %T", env=env)
  return [ln.split() for ln in out.splitlines() if ln.strip()]


def _interrupt_mid_run(workdir, member, command, env):
  """Runs ``command`` once ``member`` has logged a few of its steps, before it ends."""
  folder = os.path.join(workdir, member)
  _wait(f"{member} to train", lambda: _steps_logged(folder) >= 3)
  subprocess.run(command, env=env, check=True, capture_output=True)


def _write_config(root, data, spec):
  """The runlocal config on ``data`` with ``STEPS`` steps, and ``get_sweep`` returning ``spec``."""
  config_file = os.path.join(root, "sweep_config.py")
  with open(config_file, "w") as f:
    f.write(textwrap.dedent(f'''\
        from configs import pneumoniamnist_resnet18


        def get_config(arg=None):
          c = pneumoniamnist_resnet18.get_config("runlocal")
          c.data.dir = {data!r}
          c.train.steps = {STEPS}
          c.eval.every_steps = {STEPS}
          c.train.record_batches = True
          return c


        def get_sweep(arg=None):
          return {spec!r}
        '''))
  return config_file


# ---------------------------------------------------------------------------------------------
# Without a cluster: settings and the generated script.
# ---------------------------------------------------------------------------------------------

def test_flags_override_the_config_s_slurm_entry_and_bad_entries_are_refused():
  section = {"partition": "gpu", "time": "1:00:00", "gpus": 1, "options": ["--qos=low"]}
  s = slurm.SlurmSettings.from_sources(section, {"time": "0:10:00", "cpus": 4, "gpus": None,
                                                 "options": "--account=lab --qos=high"})
  assert s.directives() == ["--cpus-per-task=4", "--partition=gpu", "--time=0:10:00",
                            "--gres=gpu:1", "--account=lab", "--qos=high"]
  for bad, message in (({"partiton": "gpu"}, "unknown fields \\['partiton'\\]"),
                       ({"cpus": 0}, "cpus must be an int >= 1"),
                       ({"options": ["account=lab"]}, "sbatch options like")):
    with pytest.raises(sweep.SweepError, match=message):
      slurm.SlurmSettings.from_sources(bad, {})


def test_script_runs_member_i_as_array_task_i(tmp_path):
  config_file = _write_config(str(tmp_path), str(tmp_path / "data"), MEMBERS)
  workdir = str(tmp_path / "sweep")
  prepared = sweep.running.prepare(config_file, {}, workdir)
  settings = slurm.SlurmSettings(partition="cpu", cpus=2, max_running=1)
  backend = slurm.SlurmBackend(workdir, config_file, [], settings, LAUNCH,
                               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  text = backend.script([prepared.members[1], prepared.members[3]])
  assert "#SBATCH --array=1,3%1" in text and "#SBATCH --requeue" in text
  assert "#SBATCH --partition=cpu" in text and "#SBATCH --cpus-per-task=2" in text
  case = text.split('case "$SLURM_ARRAY_TASK_ID" in')[1]
  assert f"  1) name={NAMES[1]};" in case and f"  3) name={NAMES[3]};" in case
  assert f"--workdir={workdir}/{NAMES[3]}" in case and "--config.optim.lr=0.01" in case
  assert "  0)" not in case and "  2)" not in case
  # The submitting process's device count is not the member's.
  assert "device_count=4" not in text and "device_count=" in text


def test_get_sweep_s_slurm_entry_is_settings_not_a_swept_key(tmp_path):
  spec = {"optim.lr": [1e-3, 3e-3], "slurm": {"partition": "cpu", "time": "0:30:00"}}
  config_file = _write_config(str(tmp_path), str(tmp_path / "data"), spec)
  prepared = sweep.running.prepare(config_file, {}, str(tmp_path / "sweep"))
  assert [m.overrides for m in prepared.members] == [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}]
  settings = slurm.SlurmSettings.from_sources(prepared.slurm, {"partition": None})
  assert (settings.partition, settings.time) == ("cpu", "0:30:00")


def test_submit_without_sbatch_is_one_error_naming_it(tmp_path, monkeypatch):
  config_file = _write_config(str(tmp_path), str(tmp_path / "data"), MEMBERS)
  monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
  with pytest.raises(sweep.SweepError, match="sbatch not found"):
    slurm.submit(config_file, {}, str(tmp_path / "sweep"), {})


# ---------------------------------------------------------------------------------------------
# On the cluster.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_sweep(slurm_conf, tmp_path_factory):
  """``{workdir, outputs}`` of the sweep, made once: submit, cancel member 1, requeue member 3,
  wait, submit again, wait, then ``--sweep_status``."""

  def build(root):
    config_file = _write_config(root, write_synthetic_medmnist(root), MEMBERS)
    workdir = os.path.join(root, "sweep")
    env = dict(os.environ, SLURM_CONF=slurm_conf)  # the compile cache of conftest comes along
    outputs = {}
    rc, outputs["submit"] = _cli(config_file, workdir, "--sweep", "--sweep_backend=slurm",
                                 env=env)
    assert rc == 0, outputs["submit"]
    job = re.search(r"submitted 4 as job array (\d+)", outputs["submit"])[1]
    _interrupt_mid_run(workdir, NAMES[1], ["scancel", f"{job}_1"], env)
    _interrupt_mid_run(workdir, NAMES[3], ["scontrol", "requeue", f"{job}_3"], env)
    # SLURM holds a requeued job for about two minutes (BeginTime); let it start now.
    _wait("the requeued job to be pending", lambda: ["3", "PENDING"] in _active(job, env))
    _slurm("scontrol", "update", f"JobId={job}_3", "StartTime=now", env=env)
    _wait("the first array to end", lambda: not _active(job, env))
    outputs["status_before"] = _cli(config_file, workdir, "--sweep_status", env=env)[1]
    rc, outputs["resubmit"] = _cli(config_file, workdir, "--sweep", "--sweep_backend=slurm",
                                   env=env)
    assert rc == 0, outputs["resubmit"]
    again = re.search(r"submitted 1 as job array (\d+)", outputs["resubmit"])
    assert again, outputs["resubmit"]
    _wait("the second array to end", lambda: not _active(again[1], env))
    outputs["status_rc"], outputs["status"] = _cli(config_file, workdir, "--sweep_status",
                                                   env=env)
    outputs["jobs"] = [job, again[1]]
    return {"workdir": workdir, "outputs": outputs}

  return computed_once(tmp_path_factory, "slurm_sweep", build)


def _attempts(workdir, name):
  with open(os.path.join(workdir, "attempts.jsonl")) as f:
    return [a for a in map(json.loads, f) if a["member"] == name]


def _log(workdir, name):
  with open(os.path.join(workdir, "logs", f"{name}.log")) as f:
    return f.read()


@pytest.mark.slurm
def test_cancelled_member_is_resubmitted_and_resumes_and_all_four_are_ranked(slurm_sweep):
  workdir, out = slurm_sweep["workdir"], slurm_sweep["outputs"]
  first, second = out["jobs"]
  # Between the arrays, --sweep_status saw member 1 stopped and the others finished.
  before = {ln.split()[0]: ln.split()[1] for ln in out["status_before"].splitlines()
            if ln.startswith("m0")}
  assert before == {NAMES[0]: "done", NAMES[1]: "stopped", NAMES[2]: "done", NAMES[3]: "done"}, \
      out["status_before"]
  assert "3 finished, 0 pending or running in SLURM; submitted 1" in out["resubmit"]
  # Member 1: SIGTERM from scancel, a checkpoint, exit 143; then the new array's job resumed it.
  a = _attempts(workdir, NAMES[1])
  assert [x["returncode"] for x in a] == [143, 0], a
  assert [x["job"] for x in a] == [f"{first}_1", f"{second}_1"], a
  stopped = re.search(rf"preempted: stopped by a signal after step (\d+) of {STEPS}",
                      _log(workdir, NAMES[1]))
  assert stopped and int(stopped[1]) < STEPS, tail(_log(workdir, NAMES[1]))

  assert out["status_rc"] == 0, out["status"]
  assert "4 members: 4 done" in out["status"], out["status"]
  with open(os.path.join(workdir, "leaderboard.csv")) as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["member"] for r in rows) == NAMES
  assert sorted(int(r["rank"]) for r in rows) == [1, 2, 3, 4]
  assert all(r["status"] == "done" and r["val_auc"] for r in rows), rows


@pytest.mark.slurm
def test_requeued_member_resumes_exactly(slurm_sweep):
  workdir, out = slurm_sweep["workdir"], slurm_sweep["outputs"]
  first = out["jobs"][0]
  # One job, run twice: SLURM requeued it (restart 1), and launch.py resumed its checkpoint.
  a = _attempts(workdir, NAMES[3])
  assert [(x["returncode"], x["job"]) for x in a] == [(143, f"{first}_3"), (0, f"{first}_3")], a
  log = _log(workdir, NAMES[3])
  assert "restart 1)" in log, tail(log)
  stopped = re.search(rf"preempted: stopped by a signal after step (\d+) of {STEPS}", log)
  assert stopped and int(stopped[1]) < STEPS, tail(log)
  # The same config trained without a break: the same batches and the same parameters.
  requeued, straight = (os.path.join(workdir, n) for n in NAMES[3:1:-1])
  digests = lambda d: [json.loads(x)["digest"] for x in open(os.path.join(d, "batches.jsonl"))]
  assert digests(requeued) == digests(straight)
  assert len(digests(straight)) == STEPS
  p, q = final_params(requeued), final_params(straight)
  assert int(p["step"]) == int(q["step"]) == STEPS
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), p["params"], q["params"])
  assert max(jax.tree.leaves(diffs)) <= 1e-6
