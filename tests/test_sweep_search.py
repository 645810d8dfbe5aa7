"""Optuna searches (medjax/sweep/search.py): two workers sharing one journal-file study with
pruning, an SQLite study, taking over the trial of a dead worker, refusing bad search specs, and a
real member stopped by its pruner keeping its checkpoint.

The workers run a stand-in for launch.py that reports to its trial through the real
`search.trial_hook` (seconds, and its metric is chosen, so that pruning is certain); one test
trains a real runlocal member.
"""

import csv
import json
import os
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from conftest import REPO, write_synthetic_medmnist
from helpers import launch_cmd, tail

from medjax import sweep
from medjax.sweep import search

# The stand-in reports val auc = wd-dependent level + lr/10 at steps 1..4: weight decay 1e-2 is
# far worse, so the median pruner prunes those members once a better one has finished.
_FAKE_LAUNCH = f'''
"""Stand-in for launch.py: reports 4 evaluations to the member's trial (MEDJAX_TRIAL), stops
when pruned (pruned.json, exit 0), else writes config.json and summary.json. lr 5e-3 fails."""
import json, os, sys, time
sys.path.insert(0, {REPO!r})
from medjax import sweep
from medjax.sweep import search

arg = lambda name: next(a.split("=", 1)[1] for a in sys.argv if a.startswith(name + "="))
workdir = arg("--workdir")
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "starts"), "a") as f:
  f.write(str(os.getpid()) + "\\n")
c = sweep.parse_config(arg("--config"), [a for a in sys.argv if a.startswith("--config.")])
if c.optim.lr == 5e-3:
  print("error: step 1: loss is nan", file=sys.stderr)
  sys.exit(2)
hook = search.trial_hook(os.environ["MEDJAX_TRIAL"], "auc", workdir)
auc = (0.9 if c.optim.weight_decay < 1e-3 else 0.6) + c.optim.lr / 10
for step in range(1, 5):
  time.sleep(float(os.environ.get("FAKE_STEP_S", "0.3")))
  if step < 4 and hook(step, {{"auc": auc * step / 4}}):
    print("pruned", flush=True)
    sys.exit(0)
with open(os.path.join(workdir, "config.json"), "w") as f:
  json.dump(json.loads(c.to_json()), f)
with open(os.path.join(workdir, "summary.json"), "w") as f:
  json.dump({{"split": "val", "steps": 4, "best_step": 4, "final": {{}},
             "best": {{"auc": auc, "acc": 0.5}}}}, f)
'''

_SPACE = {"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3], "optim.weight_decay": [1e-4, 1e-2]}


def _write_config(tmp_path, search_spec: dict) -> str:
  path = tmp_path / "search_config.py"
  path.write_text(textwrap.dedent(f'''\
      from configs import pneumoniamnist_resnet18


      def get_config(arg=None):
        return pneumoniamnist_resnet18.get_config("runlocal")


      def get_sweep(arg=None):
        return {{"search": {search_spec!r}}}
  '''))
  return str(path)


@pytest.fixture
def fake_launch(tmp_path):
  path = tmp_path / "fake_launch.py"
  path.write_text(_FAKE_LAUNCH)
  return str(path)


def _worker(config_arg, workdir, fake_launch, log, workers=1, env=None):
  """One ``--sweep`` command of the search, its members run by the stand-in."""
  code = ("import sys; sys.argv[0] = 'launch.py'; sys.path.insert(0, %r); import launch; "
          "launch.__file__ = %r; from absl import app; "
          "app.run(launch.main, flags_parser=launch._parse_flags)") % (REPO, fake_launch)
  cmd = [sys.executable, "-c", code, f"--config={config_arg}", f"--workdir={workdir}",
         "--sweep", f"--sweep_workers={workers}"]
  return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, **(env or {})))


def _leaderboard(workdir):
  with open(os.path.join(workdir, "leaderboard.csv")) as f:
    return list(csv.DictReader(f))


def _run_two_workers(tmp_path, config_arg, workdir, fake_launch):
  logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]
  procs = [_worker(config_arg, workdir, fake_launch, log) for log in logs]
  for p in procs:
    p.wait(timeout=120)
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  return [p.returncode for p in procs], outs


def test_two_workers_share_a_journal_study_and_prune(tmp_path, fake_launch):
  spec = {"space": _SPACE, "sampler": "grid", "seed": 0, "n_trials": 8, "pruner": "median",
          "pruner_kwargs": {"n_startup_trials": 1}}
  config_arg = _write_config(tmp_path, spec)
  workdir = str(tmp_path / "search")
  codes, outs = _run_two_workers(tmp_path, config_arg, workdir, fake_launch)
  assert codes == [0, 0], outs

  # One study in the journal file, 8 trials over the 8 grid points, run by both workers.
  study = optuna.load_study(study_name="search", storage=optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(os.path.join(workdir, "study.journal"))))
  trials = study.get_trials()
  assert len(trials) == 8
  assert sorted((t.params["optim.lr"], t.params["optim.weight_decay"]) for t in trials) == \
      sorted((lr, wd) for lr in _SPACE["optim.lr"] for wd in _SPACE["optim.weight_decay"])
  states = [t.state for t in trials]
  assert optuna.trial.TrialState.PRUNED in states
  assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
  started = [ln.split()[1] for out in outs for ln in out.splitlines() if ln.startswith("start:")]
  assert len(started) == 8 and len(set(started)) == 8, outs
  assert all(any(ln.startswith("start:") for ln in out.splitlines()) for out in outs), outs

  # Every trial in one leaderboard; pruned members marked, stopped where they were pruned.
  rows = {r["member"]: r for r in _leaderboard(workdir)}
  assert sorted(rows) == sorted(started)
  for t in trials:
    name = t.user_attrs["member"]
    assert rows[name]["status"] == ("pruned" if t.state.name == "PRUNED" else "done")
    if t.state.name == "PRUNED":
      with open(os.path.join(workdir, name, "pruned.json")) as f:
        assert json.load(f)["step"] == t.last_step == int(rows[name]["steps"]) < 4
    else:
      assert float(rows[name]["val_auc"]) == pytest.approx(t.value)
  best = [r for r in rows.values() if r["best"] == "1"]
  assert len(best) == 1 and best[0]["member"] == study.best_trial.user_attrs["member"]
  assert float(best[0]["optim.lr"]) == 4e-3 and float(best[0]["optim.weight_decay"]) == 1e-4

  # Running the command again asks nothing more: the study has its 8 trials.
  codes, outs = _run_two_workers(tmp_path, config_arg, workdir, fake_launch)
  assert codes == [0, 0] and not any("start:" in out for out in outs), outs
  assert len(study.get_trials()) == 8


def test_sqlite_study_records_failures_and_retakes_a_dead_workers_trial(tmp_path, fake_launch):
  db = tmp_path / "study.db"
  spec = {"space": {"optim.lr": [1e-3, 5e-3]}, "sampler": "grid", "n_trials": 2,
          "storage": f"sqlite:///{db}", "study_name": "lr"}
  config_arg = _write_config(tmp_path, spec)
  workdir = str(tmp_path / "search")
  # A worker killed while its member runs leaves the trial running in the study.
  log = open(tmp_path / "killed.log", "w+")
  p = _worker(config_arg, workdir, fake_launch, log, env={"FAKE_STEP_S": "30"})
  deadline = time.monotonic() + 60
  while not any(os.path.exists(os.path.join(workdir, d, "starts"))
                for d in (os.listdir(workdir) if os.path.isdir(workdir) else [])):
    assert p.poll() is None and time.monotonic() < deadline, log.seek(0) or log.read()
    time.sleep(0.1)
  p.kill()
  p.wait()
  study = optuna.load_study(study_name="lr", storage=f"sqlite:///{db}")
  assert [t.state.name for t in study.get_trials()] == ["RUNNING", "WAITING"]  # grid order
  first = study.get_trials()[0].user_attrs["member"]
  assert first.startswith("t000_lr=0.001")

  with open(tmp_path / "second.log", "w+") as log:
    p = _worker(config_arg, workdir, fake_launch, log)
    assert p.wait(timeout=120) == 1  # a member failed
    log.seek(0)
    out = log.read()
  trials = study.get_trials()
  assert len(trials) == 2, out
  by_lr = {t.params["optim.lr"]: t for t in trials}
  assert by_lr[1e-3].state.name == "COMPLETE" and by_lr[5e-3].state.name == "FAIL", out
  # The dead worker's trial was taken over (its member started again), not asked anew.
  assert by_lr[1e-3].number == 0 and by_lr[1e-3].user_attrs["member"] == first
  with open(os.path.join(workdir, first, "starts")) as f:
    assert len(f.read().split()) == 2
  rows = {r["member"]: r for r in _leaderboard(workdir)}
  failed = by_lr[5e-3].user_attrs["member"]
  assert rows[failed]["status"] == "failed"
  assert "loss is nan" in rows[failed]["error"] and "loss is nan" in out


@pytest.mark.parametrize("spec, message", [
    ({"space": {"optim.lr": [1e-3]}}, "'n_trials' >= 1"),
    ({"space": {"optim.lr": [1e-3]}, "n_trials": 2, "sampler": "cmaes"}, "sampler 'cmaes'"),
    ({"space": {"optim.lr": [1e-3]}, "n_trials": 2, "pruner": "hyperband"}, "pruner 'hyperband'"),
    ({"space": {"optim.lr": ("loguniform", 0, 1)}, "n_trials": 2}, "not a distribution"),
    ({"space": {"optim.lr": ("uniform", 0, 1)}, "n_trials": 2, "sampler": "grid"},
     "grid sampler takes lists"),
    ({"space": {"optim.lr": [1e-3]}, "n_trials": 2, "trials": 3}, "unknown fields ['trials']"),
])
def test_bad_search_specs_are_refused(spec, message):
  with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace("[", r"\[")):
    search.check_spec(spec)


def test_unknown_search_key_stops_before_anything_runs(tmp_path):
  config_arg = _write_config(tmp_path, {"space": {"optim.lrr": [1e-3]}, "n_trials": 1})
  workdir = str(tmp_path / "search")
  p = subprocess.run(launch_cmd(workdir, ["--sweep"], config_file=config_arg), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  out = p.stdout + p.stderr
  assert p.returncode == 2 and "Traceback" not in out, tail(out)
  assert "error: sweep key 'optim.lrr'" in out and "did you mean 'optim.lr'" in out, tail(out)
  assert not os.path.exists(os.path.join(workdir, "study.journal"))


def test_pruned_member_stops_after_its_evaluation_and_keeps_its_checkpoint(tmp_path):
  """A real runlocal member whose trial the pruner stops at its first evaluation (step 2 of 4)."""
  data = write_synthetic_medmnist(str(tmp_path))
  workdir = str(tmp_path / "search")
  storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
      str(tmp_path / "study.journal")))
  study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
  for v in (2.0, 3.0):  # two finished trials far better than any AUC at every step
    t = study.ask()
    for step in (2, 4):
      t.report(v, step)
    study.tell(t, v)
  trial = study.ask()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             MEDJAX_TRIAL=json.dumps({"storage": str(tmp_path / "study.journal"), "study": "s",
                                      "trial": trial.number, "pruner": "median",
                                      "pruner_kwargs": {"n_startup_trials": 2}}))
  member = os.path.join(workdir, "t002")
  p = subprocess.run(launch_cmd(member, [f"--config.data.dir={data}"]), cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=240)
  out = p.stdout + p.stderr
  assert p.returncode == 0 and "pruned: stopped after the evaluation of step 2 of 4" in out, \
      tail(out)
  with open(os.path.join(member, "pruned.json")) as f:
    assert json.load(f)["step"] == 2
  assert sorted(os.listdir(os.path.join(member, "checkpoints"))) == ["2"]
  assert not os.path.exists(os.path.join(member, "summary.json"))
  assert study.get_trials()[-1].intermediate_values.keys() == {2}


def test_config_search_variant_is_a_valid_search(tmp_path):
  from configs import pneumoniamnist_resnet18

  spec = pneumoniamnist_resnet18.get_sweep("runlocal,search")
  assert search.is_search(spec) and not search.is_search(pneumoniamnist_resnet18.get_sweep())
  config_arg = os.path.join(REPO, "configs/pneumoniamnist_resnet18.py:runlocal,search")
  s = search.Search(config_arg, {}, str(tmp_path / "tpe"), spec["search"])
  got = s.next_trial()
  assert got is not None and got[1].name.startswith("t000_lr=")
  assert 3e-4 <= got[1].config["optim"]["lr"] <= 1e-2
