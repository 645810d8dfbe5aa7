"""``launch.py --sweep`` (medjax/sweep/): expanding specs into named members, refusing bad ones
before anything runs, the worker pool, stopping, skipping finished members, and the leaderboard.

Most tests run the sweep on a stand-in for launch.py that only writes the files a run leaves
(seconds). One test trains the four members of the PneumoniaMNIST grid for real, kills the sweep
part-way and finishes it with a second command.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, write_synthetic_medmnist
from helpers import launch_cmd, tail

from configs import pneumoniamnist_resnet18
from medjax import sweep

GRID = {"optim.lr": [1e-3, 3e-3], "optim.weight_decay": [1e-4, 1e-2]}
NAMES = ["m00_lr=0.001_wd=0.0001", "m01_lr=0.001_wd=0.01", "m02_lr=0.003_wd=0.0001",
         "m03_lr=0.003_wd=0.01"]


def _write_config(tmp_path, get_sweep_source: str, steps=4) -> str:
  """A config file in ``tmp_path``: the runlocal PneumoniaMNIST config with ``steps`` steps and
  the given ``get_sweep`` source."""
  path = tmp_path / "sweep_config.py"
  path.write_text(textwrap.dedent(f'''\
      from configs import pneumoniamnist_resnet18


      def get_config(arg=None):
        c = pneumoniamnist_resnet18.get_config("runlocal")
        c.train.steps = {steps}
        return c

  ''') + textwrap.dedent(get_sweep_source))
  return str(path)


_REAL_GRID = "from configs.pneumoniamnist_resnet18 import get_sweep  # noqa: F401\n"


def _processes_mentioning(text: str) -> list[int]:
  """Live processes whose command line contains ``text`` (Linux /proc)."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if text.encode() in f.read():
          pids.append(int(pid))
    except OSError:
      pass
  return pids


def _wait_until_gone(text: str, timeout=30) -> None:
  deadline = time.monotonic() + timeout
  while _processes_mentioning(text):
    assert time.monotonic() < deadline, f"processes still running: {_processes_mentioning(text)}"
    time.sleep(0.1)


def _leaderboard(workdir) -> list[dict[str, str]]:
  with open(os.path.join(workdir, "leaderboard.csv")) as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Spec → members.
# ---------------------------------------------------------------------------------------------

def test_grid_is_the_product_last_key_fastest():
  members = sweep.expand(GRID)
  assert members == [{"optim.lr": lr, "optim.weight_decay": wd}
                     for lr in GRID["optim.lr"] for wd in GRID["optim.weight_decay"]]
  assert sweep.member_names(members) == NAMES
  # The same grid written with a method, and with a fixed (non-list) value.
  assert sweep.expand({"method": "grid", "space": GRID}) == members
  fixed = sweep.expand({**GRID, "train.label_smoothing": 0.1})
  assert [m["train.label_smoothing"] for m in fixed] == [0.1] * 4


def test_config_declares_the_2x2_grid():
  members = sweep.expand(pneumoniamnist_resnet18.get_sweep())
  assert len(members) == 4 and sweep.member_names(members) == NAMES
  assert pneumoniamnist_resnet18.get_sweep("runlocal") == pneumoniamnist_resnet18.get_sweep()


def test_random_search_is_seeded_and_reproducible():
  space = {"optim.lr": ("loguniform", 1e-4, 1e-2), "optim.weight_decay": ("choice", [0.0, 1e-4]),
           "train.batch_size": [16, 32], "optim.warmup_fraction": ("uniform", 0.0, 0.1),
           "seed": ("randint", 0, 3), "model.name": "resnet_tiny"}
  spec = {"method": "random", "count": 6, "seed": 0, "space": space}
  members = sweep.expand(spec)
  assert members == sweep.expand(spec)  # same seed, same members
  assert sweep.member_names(members) == sweep.member_names(sweep.expand(spec))
  assert members != sweep.expand({**spec, "seed": 1})
  assert sweep.expand({**spec, "count": 8})[:6] == members  # a longer search extends this one
  assert len(members) == 6 and len({m["optim.lr"] for m in members}) == 6
  for m in members:
    assert 1e-4 <= m["optim.lr"] <= 1e-2 and float(f"{m['optim.lr']:.3g}") == m["optim.lr"]
    assert m["optim.weight_decay"] in (0.0, 1e-4) and m["train.batch_size"] in (16, 32)
    assert 0.0 <= m["optim.warmup_fraction"] <= 0.1 and m["seed"] in range(4)
    assert m["model.name"] == "resnet_tiny"


def test_list_of_override_dicts_is_taken_as_it_is():
  spec = [{"optim.lr": 0.1}, {"optim.lr": 0.2, "optim.name": "sgd"}, {}]
  assert sweep.expand(spec) == spec
  assert sweep.member_names(spec) == ["m00_lr=0.1", "m01_lr=0.2_name=sgd", "m02"]


def test_names_are_short_unique_and_safe():
  members = [{"train.batch_size": 8, "eval.batch_size": 16, "data.train_transforms": "to_float|"
              "flip(axes=(1,))"}] * 2 + [{"optim.lr": 3e-05}] * 9
  names = sweep.member_names(members)
  # Same short name ("bs") for two keys: both fall back to their full paths.
  assert names[0] == "m00_train.batch_size=8_eval.batch_size=16_tt=to_float-flip-axes=-1-"
  assert names[2] == "m02_lr=3e-05"
  assert len(set(names)) == len(names)  # the index keeps duplicates apart
  assert names[10].startswith("m10_")


@pytest.mark.parametrize("spec, message", [
    ({"method": "bayes", "space": GRID}, "unknown sweep method 'bayes'"),
    ({"optim.lr": []}, "sweep key 'optim.lr' has an empty list of values"),
    ({"method": "random", "space": GRID}, "needs 'count' >= 1, got None"),
    ({"method": "random", "count": 2, "space": {"optim.lr": ("logunif", 1, 2)}},
     "sweep key 'optim.lr': ('logunif', 1, 2) is not a distribution"),
    ({"method": "random", "count": 2, "space": {"optim.lr": ("loguniform", 0, 1)}},
     "is not a distribution"),
    ({"method": "random", "count": 2, "space": GRID, "trials": 3}, "unknown sweep fields"),
    ([{"optim.lr": 1}, 3], "one {key: value} dict per member"),
    ("optim.lr=1", "get_sweep() returned a str"),
])
def test_bad_specs_are_refused(spec, message):
  with pytest.raises(sweep.SweepError) as raised:
    sweep.expand(spec)
  assert message in str(raised.value), str(raised.value)


def test_members_are_checked_against_the_config(tmp_path):
  config_arg = _write_config(tmp_path, _REAL_GRID)
  members = sweep.expand(GRID)
  configs = sweep.check_members(config_arg, {"data.dir": "/d"}, members, NAMES)
  assert [(c.optim.lr, c.optim.weight_decay, c.data.dir) for c in configs] == [
      (m["optim.lr"], m["optim.weight_decay"], "/d") for m in members]
  cases = [
      ([{"optim.lrr": 0.1}], {}, "sweep key 'optim.lrr' (member m0) is not in the config of "
       f"{config_arg}; did you mean 'optim.lr'?"),
      ([{"optim.lr": "fast"}], {}, "member m0: flag --config.optim.lr=fast: could not convert"),
      ([{"train.batch_size": 1.5}], {}, "member m0: flag --config.train.batch_size=1.5"),
      ([{"optim.lr": 0.1}], {"optim.lr": 0.2}, "optim.lr is swept and also set by --config"),
  ]
  for members, base, message in cases:
    with pytest.raises(sweep.SweepError) as raised:
      sweep.check_members(config_arg, base, members, ["m0"])
    assert str(raised.value).startswith(message), str(raised.value)


def test_bad_sweep_stops_before_anything_runs(tmp_path):
  config_arg = _write_config(tmp_path, '''
      def get_sweep(arg=None):
        return {"optim.lr": [1e-3, 3e-3], "optim.weight_decya": [0.0, 1e-4]}
  ''')
  workdir = str(tmp_path / "sweep")
  p = subprocess.run(launch_cmd(workdir, ["--sweep"], config_file=config_arg), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  out = p.stdout + p.stderr
  assert p.returncode == 2 and "Traceback" not in out, tail(out)
  assert [ln for ln in out.splitlines() if ln.startswith("error: ")] == [
      "error: sweep key 'optim.weight_decya' (member m00_lr=0.001_wd=0) is not in the config of "
      f"{config_arg}; did you mean 'optim.weight_decay'?"], tail(out)
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------------
# Running, on a stand-in for launch.py.
# ---------------------------------------------------------------------------------------------

_FAKE_LAUNCH = f'''
"""Stand-in for launch.py. FAKE=sleep: waits to be stopped. FAKE=train: writes config.json and
summary.json with val auc = 100 lr + wd, except that lr 3e-3 with wd 1e-2 fails like a diverged
run. Every start appends this process's XLA_FLAGS to <workdir>/starts."""
import json, os, sys, time
sys.path.insert(0, {REPO!r})
from medjax import sweep

arg = lambda name: next(a.split("=", 1)[1] for a in sys.argv if a.startswith(name + "="))
workdir = arg("--workdir")
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "starts"), "a") as f:
  f.write(os.environ.get("XLA_FLAGS", "") + "\\n")
if os.environ["FAKE"] == "sleep":
  time.sleep(120)
  sys.exit(0)
c = sweep.parse_config(arg("--config"), [a for a in sys.argv if a.startswith("--config.")])
if (c.optim.lr, c.optim.weight_decay) == (3e-3, 1e-2):
  print("step 3: ...", flush=True)
  print("error: step 3: loss is nan", file=sys.stderr)
  sys.exit(2)
with open(os.path.join(workdir, "config.json"), "w") as f:
  json.dump(json.loads(c.to_json()), f)
with open(os.path.join(workdir, "summary.json"), "w") as f:
  json.dump({{"split": "val", "steps": 4, "best_step": 2, "final": {{}},
             "best": {{"auc": 100 * c.optim.lr + c.optim.weight_decay, "acc": 0.5}}}}, f)
'''


@pytest.fixture
def fake_launch(tmp_path):
  path = tmp_path / "fake_launch.py"
  path.write_text(_FAKE_LAUNCH)
  return str(path)


def test_sweep_ranks_members_reports_failures_and_skips_finished(tmp_path, fake_launch, capsys,
                                                                  monkeypatch):
  monkeypatch.setenv("FAKE", "train")
  config_arg = _write_config(tmp_path, _REAL_GRID)
  workdir = str(tmp_path / "sweep")
  assert sweep.run(config_arg, {"data.dir": "/d"}, workdir, workers=2,
                   launch_script=fake_launch) == 1
  out = capsys.readouterr()
  assert "error: 1 of 4 members failed: m03_lr=0.003_wd=0.01" in out.err, out
  rows = _leaderboard(workdir)
  # Ranked by val auc (100 lr + wd); the failed member last, with launch.py's error line.
  assert [r["member"] for r in rows] == [NAMES[2], NAMES[1], NAMES[0], NAMES[3]]
  assert [r["rank"] for r in rows] == ["1", "2", "3", ""]
  assert [r["best"] for r in rows] == ["1", "0", "0", "0"]
  assert [r["status"] for r in rows] == ["done"] * 3 + ["failed"]
  assert float(rows[0]["val_auc"]) == 100 * 3e-3 + 1e-4 and rows[0]["val_acc"] == "0.5"
  assert (rows[0]["optim.lr"], rows[0]["optim.weight_decay"]) == ("0.003", "0.0001")
  assert rows[3]["error"] == "exit 2: error: step 3: loss is nan"
  assert all(float(r["wall_seconds"]) > 0 for r in rows)
  md = open(os.path.join(workdir, "leaderboard.md")).read()
  assert f"| 1 | **{NAMES[2]}** (best) | done | 0.3001 | 0.5000 | 2 | 4 |" in md, md
  assert "- m03_lr=0.003_wd=0.01: `exit 2: error: step 3: loss is nan`" in md
  with open(os.path.join(workdir, "sweep.json")) as f:
    assert json.load(f)["members"] == dict(zip(NAMES, sweep.expand(GRID)))
  # Each member got its own host-device count: conftest's 4 replaced, never duplicated.
  with open(os.path.join(workdir, NAMES[0], "starts")) as f:
    xla = f.read().split()
  counts = [int(x.split("=")[1]) for x in xla if "device_count" in x]
  assert len(counts) == 1 and 16 % counts[0] == 0, xla

  # --sweep_status reads the same state back from the folders (exit status 1: a member failed).
  assert sweep.slurm.status(config_arg, {"data.dir": "/d"}, workdir) == 1
  status = capsys.readouterr().out.splitlines()
  assert [ln.split()[:2] for ln in status[:4]] == [[n, "done"] for n in NAMES[:3]] + [
      [NAMES[3], "failed"]]
  assert status[3].endswith("exit 2: error: step 3: loss is nan"), status
  assert status[4].startswith("sweep: 4 members: 3 done, 1 failed;"), status

  # Again: the finished members are skipped, the failed one runs (and fails) again.
  assert sweep.run(config_arg, {"data.dir": "/d"}, workdir, workers=2,
                   launch_script=fake_launch) == 1
  assert "3 finished already" in capsys.readouterr().out
  starts = {n: len(open(os.path.join(workdir, n, "starts")).readlines()) for n in NAMES}
  assert starts == {NAMES[0]: 1, NAMES[1]: 1, NAMES[2]: 1, NAMES[3]: 2}
  with open(os.path.join(workdir, "attempts.jsonl")) as f:
    assert len(f.readlines()) == 5
  # Another base config: the finished members' config.json no longer match, so they run again.
  sweep.run(config_arg, {"data.dir": "/other"}, workdir, workers=2, launch_script=fake_launch)
  assert "0 finished already" in capsys.readouterr().out


_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from medjax import sweep
sys.exit(sweep.run({config!r}, {{}}, {workdir!r}, workers=2, launch_script={launch!r}))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_sweep_stops_its_members(signum, tmp_path, fake_launch):
  config_arg = _write_config(tmp_path, _REAL_GRID)
  workdir = str(tmp_path / "sweep")
  driver = _DRIVER.format(repo=REPO, config=config_arg, workdir=workdir, launch=fake_launch)
  p = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, env=dict(os.environ, FAKE="sleep"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 60
    while sum(os.path.exists(os.path.join(workdir, n, "starts")) for n in NAMES) < 2:
      assert p.poll() is None and time.monotonic() < deadline, p.stdout.read()
      time.sleep(0.1)
    p.send_signal(signum)
    out, _ = p.communicate(timeout=60)
  finally:
    p.kill()
  _wait_until_gone(fake_launch)  # killed with the sweep, by PR_SET_PDEATHSIG for SIGKILL
  if signum == signal.SIGTERM:
    assert p.returncode == 128 + signum, out
    assert "stopped by SIGTERM; unfinished: " + ", ".join(NAMES) in out, out
    assert [r["status"] for r in _leaderboard(workdir)] == ["stopped"] * 2 + ["pending"] * 2
    with open(os.path.join(workdir, "attempts.jsonl")) as f:
      assert [json.loads(ln)["status"] for ln in f] == ["stopped"] * 2
  else:
    assert p.returncode == -signum


# ---------------------------------------------------------------------------------------------
# The real thing: four tiny trainings, two at a time, killed part-way and resumed.
# ---------------------------------------------------------------------------------------------

def _pin_to_two_cores():
  """The sweep under test sees at most 2 cores: one per worker, whatever machine runs the test."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


def test_sweep_killed_part_way_resumes_and_ranks(tmp_path):
  data = write_synthetic_medmnist(str(tmp_path))
  config_arg = _write_config(tmp_path, _REAL_GRID, steps=4)
  workdir = str(tmp_path / "sweep")
  cmd = launch_cmd(workdir, ["--sweep", "--sweep_workers=2", f"--config.data.dir={data}"],
                   config_file=config_arg)
  dirs = [os.path.join(workdir, n) for n in NAMES]
  done = lambda d: os.path.exists(os.path.join(d, "summary.json"))
  started = lambda d: os.path.exists(os.path.join(d, "config.json"))

  with open(tmp_path / "first.log", "w+") as log:
    p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                         preexec_fn=_pin_to_two_cores)
    try:
      deadline = time.monotonic() + 150
      while not (any(map(done, dirs)) and any(started(d) and not done(d) for d in dirs)):
        assert p.poll() is None and time.monotonic() < deadline, log.seek(0) or log.read()
        time.sleep(0.1)
      p.send_signal(signal.SIGKILL)
      p.wait()
    finally:
      p.kill()
  _wait_until_gone(workdir)
  finished = [d for d in dirs if done(d)]
  assert 1 <= len(finished) < 4
  before = {d: (os.stat(os.path.join(d, "summary.json")).st_mtime_ns,
                open(os.path.join(d, "metrics.jsonl")).read()) for d in finished}

  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                     preexec_fn=_pin_to_two_cores)
  out = p.stdout + p.stderr
  assert p.returncode == 0, tail(out, 60)
  assert f"{len(finished)} finished already" in out, out
  assert all(map(done, dirs))
  for d in finished:  # not run again: same summary, metrics logged once
    assert (os.stat(os.path.join(d, "summary.json")).st_mtime_ns,
            open(os.path.join(d, "metrics.jsonl")).read()) == before[d]
  summaries = {}
  for name, d, m in zip(NAMES, dirs, sweep.expand(GRID)):
    with open(os.path.join(d, "config.json")) as f:
      c = json.load(f)
    assert (c["optim"]["lr"], c["optim"]["weight_decay"], c["data"]["dir"], c["train"]["steps"]) \
        == (m["optim.lr"], m["optim.weight_decay"], data, 4)
    with open(os.path.join(d, "summary.json")) as f:
      summaries[name] = json.load(f)
    assert summaries[name]["steps"] == 4

  rows = _leaderboard(workdir)
  assert sorted(r["member"] for r in rows) == NAMES
  assert all(r["status"] == "done" for r in rows), rows
  best = [r for r in rows if r["best"] == "1"]
  assert len(best) == 1 and best[0] is rows[0] and best[0]["rank"] == "1"
  auc = summaries[best[0]["member"]]["best"]["auc"]
  assert float(best[0]["val_auc"]) == auc == max(s["best"]["auc"] for s in summaries.values())
  with open(os.path.join(workdir, best[0]["member"], "results.md")) as f:
    assert f"{auc:.4f}" in f.read()
  md = open(os.path.join(workdir, "leaderboard.md")).read()
  assert f"| 1 | **{best[0]['member']}** (best) | done | {auc:.4f} |" in md, md
  assert f"best: {best[0]['member']}: val_auc {auc:.4f}" in out


def test_segmentation_member_is_finished_only_after_its_validation(tmp_path):
  config = {"task": "segmentation", "optim": {"lr": 1e-3}}
  member = sweep.Member(0, "m00", {"optim.lr": 1e-3}, str(tmp_path), config)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  (tmp_path / "summary.json").write_text("{}")
  # Killed during launch.py's sliding-window validation: training is done, the member is not.
  assert not member.finished()
  (tmp_path / "validation").mkdir()
  (tmp_path / "validation" / "summary.json").write_text("{}")
  assert member.finished()
  classification = sweep.Member(0, "m00", {}, str(tmp_path), {**config, "task": "classification"})
  assert not classification.finished()  # config.json is another member's


@pytest.mark.parametrize("onednn_available,expected", [(True, 1), (False, 4)])
def test_cpu_member_gets_one_device_for_onednn_else_one_per_core(monkeypatch, onednn_available,
                                                                   expected):
  from medjax.ops.cpu import onednn
  monkeypatch.setattr(onednn, "available", lambda: onednn_available)
  worker = sweep.Worker({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false", "JAX_PLATFORMS": "cpu"},
                        {0, 1, 2, 3}, 4, "test")
  env = worker.member_env({"train": {"batch_size": 128}, "eval": {"batch_size": 256}})
  assert env["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false",
                                      f"--xla_force_host_platform_device_count={expected}"]


def test_members_per_device_share_each_gpu_without_preallocation(monkeypatch):
  from medjax.sweep import workers

  monkeypatch.setattr(workers, "visible_gpus", lambda env: ["0", "1"])
  one = sweep.make_workers(None, env={})
  assert [w.env["CUDA_VISIBLE_DEVICES"] for w in one] == ["0", "1"]  # the default: one each
  assert all("XLA_PYTHON_CLIENT_PREALLOCATE" not in w.env for w in one)
  shared = sweep.make_workers(None, env={}, members_per_device=3)
  assert [w.env["CUDA_VISIBLE_DEVICES"] for w in shared] == ["0", "1"] * 3
  assert all(w.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for w in shared)
  assert [w.env["CUDA_VISIBLE_DEVICES"] for w in
          sweep.make_workers(3, env={}, members_per_device=2)] == ["0", "1", "0"]
  with pytest.raises(sweep.SweepError, match="more than --members_per_device=2"):
    sweep.make_workers(5, env={}, members_per_device=2)
  with pytest.raises(sweep.SweepError, match="unless --members_per_device"):
    sweep.make_workers(3, env={})
  monkeypatch.setattr(workers, "visible_gpus", lambda env: [])
  with pytest.raises(sweep.SweepError, match="no GPU is visible"):
    sweep.make_workers(None, env={}, members_per_device=2)
