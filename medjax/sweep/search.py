r"""Searches that learn and prune: Optuna's ask-and-tell over a study that several workers share.

  python launch.py --config configs/x.py --workdir runs/search --sweep [--sweep_workers 2]

``get_sweep()`` returns a dict with a ``"search"`` entry (and optionally ``"slurm"``)::

  {"search": {
      "space": {"optim.lr": ("loguniform", 1e-4, 1e-2), "optim.weight_decay": [1e-4, 1e-2]},
      "sampler": "tpe",          # "tpe" | "random" | "grid" (every point of the lists once)
      "seed": 0,                 # the sampler's seed
      "n_trials": 8,             # trials of the whole study, over all workers
      "pruner": "median",        # "median" | "halving" | None; "pruner_kwargs": {...} its args
      "storage": None,           # None: <workdir>/study.journal; a path; or an RDB URL
      "study_name": None}}       # None: the workdir's folder name

The space takes the random search's distributions (medjax/sweep/__init__.py): ``("loguniform",
lo, hi)``, ``("uniform", lo, hi)``, ``("randint", lo, hi)``, ``("choice", [values])`` or a bare
list, or a fixed value; the grid sampler takes lists. The study maximises ``eval.best_metric``.

Each trial is one member: ``launch.py`` in ``<workdir>/t<number>_<overrides>``. The member reports
each evaluation's ``eval.best_metric`` to its trial (``trial.report``) and, when the pruner says
so, stops after that evaluation's checkpoint and writes ``pruned.json`` in its folder
(`trial_hook`, called by launch.py when ``MEDJAX_TRIAL`` names the trial). The worker then tells
the study the trial's outcome: the member's best metric, pruned, or failed.

The storage is what the workers share: a journal file (Optuna's ``JournalFileBackend``, which
locks with symlinks, so any shared file system works) or an RDB URL (``sqlite:///search.db``,
``postgresql://...``). Every ``--sweep`` process on the same workdir and storage draws from the
same study, on this machine or others: several local commands, SLURM array tasks
(``--sweep_backend=slurm`` submits ``--sweep_workers`` tasks, each a one-worker search), or both.

A worker holds ``<workdir>/trials/<member>.lock`` (``flock``) while its trial runs. Re-running the
command continues the study: finished and pruned trials stay; a running trial whose lock is free
(its worker died) is taken over and its member resumes from its checkpoint; failed trials stay
failed, in the leaderboard with their error, and new trials take their place up to ``n_trials``.
The leaderboard (``leaderboard.csv``/``.md``, rewritten after each trial) lists every trial of
the study, whichever worker ran it; ``steps`` is where a pruned member stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from medjax.io.atomic import atomic_write
from medjax.sweep.leaderboard import Leaderboard
from medjax.sweep.running import (
    _child_setup,
    _Running,
    default_launch_script,
    last_error,
    stop_members,
)
from medjax.sweep.spec import Member, SweepError, check_members, override_flags, parse_config
from medjax.sweep.workers import make_workers

TRIAL_ENV = "MEDJAX_TRIAL"  # set for a member: {"storage", "study", "trial"} as JSON
PRUNED_FILE = "pruned.json"
_FIELDS = {"space", "sampler", "seed", "n_trials", "pruner", "pruner_kwargs", "storage",
           "study_name"}


def is_search(spec: Any) -> bool:
  """Whether ``get_sweep()`` declared an Optuna search (a dict with a ``"search"`` entry)."""
  return isinstance(spec, dict) and "search" in spec


def check_spec(search: Any) -> dict[str, Any]:
  """The ``"search"`` entry with its defaults, or `SweepError` naming what is wrong."""
  if not isinstance(search, dict):
    raise SweepError(f"get_sweep()'s 'search' entry must be a dict, got {search!r}")
  unknown = set(search) - _FIELDS
  if unknown:
    raise SweepError(f"get_sweep()'s 'search' has unknown fields {sorted(unknown)}; known: "
                     f"{sorted(_FIELDS)}")
  s = {"sampler": "tpe", "seed": 0, "pruner": None, "pruner_kwargs": {}, "storage": None,
       "study_name": None, **search}
  if not isinstance(s.get("space"), dict) or not s["space"]:
    raise SweepError("a search needs a 'space': {config key: distribution}")
  if not isinstance(s.get("n_trials"), int) or isinstance(s["n_trials"], bool) or \
      s["n_trials"] < 1:
    raise SweepError(f"a search needs 'n_trials' >= 1, got {s.get('n_trials')!r}")
  if s["sampler"] not in ("tpe", "random", "grid"):
    raise SweepError(f"search sampler {s['sampler']!r}: use 'tpe', 'random' or 'grid'")
  if s["pruner"] not in (None, "median", "halving"):
    raise SweepError(f"search pruner {s['pruner']!r}: use 'median', 'halving' or None")
  for key, dist in s["space"].items():
    _distribution(key, dist, s["sampler"])
  return s


def _distribution(key: str, dist: Any, sampler: str):
  """Optuna's distribution for ``dist`` (None for a fixed value)."""
  import optuna.distributions as d

  if isinstance(dist, list):
    dist = ("choice", dist)
  if not (isinstance(dist, tuple) and dist and isinstance(dist[0], str)):
    return None
  name, *args = dist
  if sampler == "grid" and name != "choice":
    raise SweepError(f"search key {key!r}: the grid sampler takes lists of values, got {dist!r}")
  if name == "choice" and len(args) == 1 and isinstance(args[0], (list, tuple)) and args[0]:
    return d.CategoricalDistribution(list(args[0]))
  if name in ("uniform", "loguniform", "randint") and len(args) == 2:
    lo, hi = args
    if name == "randint" and isinstance(lo, int) and isinstance(hi, int) and lo <= hi:
      return d.IntDistribution(lo, hi)
    if name == "uniform" and lo <= hi:
      return d.FloatDistribution(lo, hi)
    if name == "loguniform" and 0 < lo <= hi:
      return d.FloatDistribution(lo, hi, log=True)
  raise SweepError(f"search key {key!r}: {dist!r} is not a distribution; use ('choice', "
                   "[values]), ('uniform', lo, hi), ('loguniform', lo, hi) with 0 < lo <= hi, "
                   "or ('randint', lo, hi) with ints")


def open_study(s: dict[str, Any], workdir: str, direction: bool = True):
  """The study of search ``s`` in ``workdir`` (created on first use)."""
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  storage = storage_of(s, workdir)
  kwargs = dict(s["pruner_kwargs"])
  try:
    pruner = {None: optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
              "halving": optuna.pruners.SuccessiveHalvingPruner}[s["pruner"]](**kwargs)
  except TypeError as e:
    raise SweepError(f"search pruner_kwargs {kwargs!r}: {e}") from None
  name = s["study_name"] or os.path.basename(workdir.rstrip("/"))
  return optuna.create_study(storage=storage, study_name=name, sampler=make_sampler(s, 0),
                             pruner=pruner, direction="maximize", load_if_exists=True)


def make_sampler(s: dict[str, Any], asked: int):
  """The sampler of search ``s`` for its trial number ``asked``, seeded with ``seed + asked``:
  workers in other processes draw different points, and each trial's draw depends only on the
  seed and the trials before it, whichever worker asks."""
  import optuna

  seed = s["seed"] + asked
  if s["sampler"] in ("random", "grid"):  # a grid's points are enqueued (`Search.next_trial`)
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(seed=seed)


def storage_of(s: dict[str, Any], workdir: str):
  """An RDB URL as it is; else a journal file (``<workdir>/study.journal`` by default)."""
  from optuna.storages import JournalStorage
  from optuna.storages.journal import JournalFileBackend

  where = s["storage"]
  if isinstance(where, str) and "://" in where:
    return where
  path = os.path.abspath(where or os.path.join(workdir, "study.journal"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return JournalStorage(JournalFileBackend(path))


def storage_label(s: dict[str, Any], workdir: str) -> str:
  where = s["storage"]
  if isinstance(where, str) and "://" in where:
    return where
  return os.path.abspath(where or os.path.join(workdir, "study.journal"))


# ---------------------------------------------------------------------------------------------
# The member's side: reporting evaluations, stopping when pruned.
# ---------------------------------------------------------------------------------------------

def trial_hook(value: str, best_metric: str, workdir: str) -> Callable[[int, dict], bool]:
  """launch.py's ``on_eval`` for a member whose ``MEDJAX_TRIAL`` is ``value``: reports the metric
  to the trial and, once the pruner prunes it, writes ``pruned.json`` and returns True."""
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  info = json.loads(value)
  study = optuna.load_study(study_name=info["study"], pruner=_pruner(info),
                            storage=storage_of({"storage": info["storage"]}, workdir))
  trial = _trial(study, info["trial"])

  def on_eval(step: int, metrics: dict[str, float]) -> bool:
    v = metrics.get(best_metric)
    if v is None or v != v:
      return False
    trial.report(float(v), step)
    if not trial.should_prune():
      return False
    atomic_write(os.path.join(workdir, PRUNED_FILE), json.dumps(
        {"step": step, best_metric: float(v), "trial": info["trial"]}) + "\n")
    return True
  return on_eval


def _trial(study, number: int):
  """The live `optuna.trial.Trial` of trial ``number`` (Optuna has no public lookup by number
  outside ``tell``; these two storage methods are public)."""
  import optuna

  storage = study._storage
  trial_id = storage.get_trial_id_from_study_id_trial_number(
      storage.get_study_id_from_name(study.study_name), number)
  return optuna.trial.Trial(study, trial_id)


def _pruner(info: dict[str, Any]):
  import optuna

  return {None: optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
          "halving": optuna.pruners.SuccessiveHalvingPruner}[info["pruner"]](
              **info["pruner_kwargs"])


# ---------------------------------------------------------------------------------------------
# The worker's side: ask, run the member, tell.
# ---------------------------------------------------------------------------------------------

class Search:
  """A search in ``workdir``: its spec, study and members (one per trial)."""

  def __init__(self, config_arg: str, base: dict[str, Any], workdir: str, spec: dict[str, Any]):
    self.config_arg, self.base, self.workdir = config_arg, base, os.path.abspath(workdir)
    self.s = check_spec(spec)
    # The keys are checked, as a grid sweep's are, on one point before anything runs.
    point = {k: (v.choices[0] if hasattr(v, "choices") else v.low) if v is not None else
             self.s["space"][k] for k, v in self._space().items()}
    check_members(config_arg, base, [point], ["(the search space)"])
    self.eval_config = parse_config(config_arg, override_flags(base)).eval
    self.study = open_study(self.s, self.workdir)
    os.makedirs(os.path.join(self.workdir, "trials"), exist_ok=True)
    os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)

  def _space(self) -> dict[str, Any]:
    return {k: _distribution(k, v, self.s["sampler"]) for k, v in self.s["space"].items()}

  def member(self, trial) -> Member:
    """The member of a trial (a `FrozenTrial` or `Trial`), named after its number and values."""
    overrides = {k: (trial.params[k] if v is not None else self.s["space"][k])
                 for k, v in self._space().items()}
    short = {k: k.rsplit(".", 1)[-1] for k in overrides}
    short = {k: "".join(p[0] for p in s.split("_")) if "_" in s else s for k, s in short.items()}
    parts = [f"t{trial.number:03d}"] + [f"{short[k]}={v:.3g}" if isinstance(v, float) else
                                        f"{short[k]}={v}" for k, v in overrides.items()]
    name = "_".join(parts).replace("/", "-")[:100]
    config = parse_config(self.config_arg, override_flags(self.base) + override_flags(overrides))
    return Member(trial.number, name, overrides, os.path.join(self.workdir, name),
                  json.loads(config.to_json()))

  @contextlib.contextmanager
  def _asking(self) -> Iterator[None]:
    """One worker at a time counts the trials and asks (``<workdir>/.ask.lock``)."""
    with open(os.path.join(self.workdir, ".ask.lock"), "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      yield

  def next_trial(self) -> tuple[int, Member, Any] | None:
    """A trial for this worker, with its lock held: a running trial whose worker died, else a
    new one while the study has fewer than ``n_trials``; None when there is nothing to run."""
    import optuna

    with self._asking():
      trials = self.study.get_trials(deepcopy=False)
      if self.s["sampler"] == "grid" and not trials:
        # Each point of the grid enqueued once, in the grid sweep's order, rather than Optuna's
        # GridSampler: it draws points in a random order, may draw one twice when workers in
        # other processes ask, and its study.stop() fails outside study.optimize.
        for point in itertools.product(*(v.choices for v in self._space().values()
                                          if v is not None)):
          self.study.enqueue_trial(dict(zip([k for k, v in self._space().items()
                                             if v is not None], point)))
        trials = self.study.get_trials(deepcopy=False)
      for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING and self._space_has_dists() and \
            set(t.params) != {k for k, v in self._space().items() if v is not None}:
          # Asked by a worker that died before drawing its point (asking holds the lock, so no
          # live worker is in the middle of it): nothing ran.
          self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        elif t.state == optuna.trial.TrialState.RUNNING:
          m = self.member(t)
          lock = _try_lock(self._lock_path(m))
          if lock is not None:
            return t.number, m, lock
      asked = [t for t in trials if t.state != optuna.trial.TrialState.WAITING]
      waiting = len(trials) - len(asked)
      if len(asked) >= self.s["n_trials"] or (self.s["sampler"] == "grid" and not waiting):
        return None
      self.study.sampler = make_sampler(self.s, len(asked))
      trial = self.study.ask()
      for k, dist in self._space().items():
        if dist is not None:
          _suggest(trial, k, dist)
      m = self.member(trial)
      trial.set_user_attr("member", m.name)
      return trial.number, m, _try_lock(self._lock_path(m))

  def _lock_path(self, m: Member) -> str:
    return os.path.join(self.workdir, "trials", f"{m.name}.lock")

  def members(self) -> list[Member]:
    """Every trial's member with its status: done, pruned, failed, running (or waiting)."""
    import optuna

    out = []
    for t in self.study.get_trials(deepcopy=False):
      if t.state == optuna.trial.TrialState.WAITING:
        continue  # a grid point not asked yet
      if self._space_has_dists() and not t.params:
        continue  # asked by a worker that died before drawing its point: nothing ran
      m = self.member(t)
      m.status = {optuna.trial.TrialState.COMPLETE: "done", optuna.trial.TrialState.PRUNED:
                  "pruned", optuna.trial.TrialState.FAIL: "failed"}.get(t.state, "running")
      m.error = t.user_attrs.get("error", "")
      if m.status == "pruned":
        m.error = f"pruned after step {t.last_step}"
      out.append(m)
    return out

  def _space_has_dists(self) -> bool:
    return any(v is not None for v in self._space().values())

  def leaderboard(self) -> Leaderboard:
    return SearchLeaderboard(self.workdir, self.members(), self.eval_config.best_metric,
                             self.eval_config.split)


def _suggest(trial, key: str, dist) -> Any:
  """``trial``'s value of ``key`` from ``dist``, through the public ``suggest_*`` calls."""
  import optuna.distributions as d

  if isinstance(dist, d.CategoricalDistribution):
    return trial.suggest_categorical(key, dist.choices)
  if isinstance(dist, d.IntDistribution):
    return trial.suggest_int(key, dist.low, dist.high, log=dist.log)
  return trial.suggest_float(key, dist.low, dist.high, log=dist.log)


class SearchLeaderboard(Leaderboard):
  """The sweep's leaderboard, where a pruned member's ``steps`` is where it stopped."""

  def summary(self, m: Member) -> dict[str, Any] | None:
    if m.status == "pruned":
      try:
        with open(os.path.join(m.workdir, PRUNED_FILE)) as f:
          return {"steps": json.load(f)["step"], "pruned": True}
      except (OSError, ValueError, KeyError):
        return None
    return super().summary(m)

  def metric(self, m: Member) -> float:
    return super().metric(m) if m.status == "done" else float("nan")


def _try_lock(path: str):
  f = open(path, "a")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    return None
  return f


def run(config_arg: str, base: dict[str, Any], workdir: str, spec: dict[str, Any],
        workers: int | None = None, launch_script: str | None = None,
        members_per_device: int = 1) -> int:
  """``--sweep`` for a search: ``workers`` members at a time, each trial asked from (or taken over
  in) the shared study, until it holds ``n_trials``. Returns 0 when none of this command's trials
  failed, 1 when one did, 128 + the signal number when stopped."""
  import optuna

  search = Search(config_arg, base, workdir, spec)
  pool = make_workers(workers, members_per_device=members_per_device)
  launch_script = launch_script or default_launch_script()
  base_cmd = [sys.executable, launch_script, f"--config={config_arg}", *override_flags(base)]
  info = {"storage": storage_label(search.s, search.workdir), "study": search.study.study_name,
          "pruner": search.s["pruner"], "pruner_kwargs": search.s["pruner_kwargs"]}
  print(f"search: study {info['study']} in {info['storage']}: "
        f"{len(search.study.trials)} of {search.s['n_trials']} trials asked; {len(pool)} "
        f"worker(s) here: {'; '.join(w.label for w in pool)}", flush=True)
  stop: list[int] = []
  handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
              for s in (signal.SIGINT, signal.SIGTERM)}
  running: dict[int, tuple[_Running, Any]] = {}
  failed, exhausted = 0, False
  try:
    while not stop and (running or not exhausted):
      for w, worker in enumerate(pool):
        if w in running or exhausted or stop:
          continue
        got = search.next_trial()
        if got is None:
          exhausted = True
          continue
        number, m, lock = got
        env = dict(worker.member_env(m.config), **{TRIAL_ENV: json.dumps(dict(info,
                                                                            trial=number))})
        cmd = [*base_cmd, f"--workdir={m.workdir}", *override_flags(m.overrides)]
        log = open(os.path.join(search.workdir, "logs", f"{m.name}.log"), "a")
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_child_setup(worker.cores, os.getpid()))
        running[w] = (_Running(m, proc, time.time(), log), lock)
        print(f"start: {m.name} ({worker.label})", flush=True)
      for w, (r, lock) in list(running.items()):
        if r.proc.poll() is None:
          continue
        del running[w]
        r.log.close()
        status = _tell(search, r)
        lock.close()
        failed += status == "failed"
        line = f"{status}: {r.member.name} in {time.time() - r.started:.0f} s"
        if r.member.error:
          line += f": {r.member.error}"
        print(line, flush=True)
        search.leaderboard().write()
      time.sleep(0.2)
  finally:
    stop_members([r for r, _ in running.values()])
    for r, lock in running.values():
      r.log.close()
      lock.close()  # the trial stays running in the study: the next command takes it over
    for s, h in handlers.items():
      signal.signal(s, h)
  board = search.leaderboard()
  best = board.write()
  states = [t.state for t in search.study.get_trials(deepcopy=False)]
  counts = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState if s in states}
  print(f"search: {len(states)} trials: {', '.join(f'{n} {k}' for k, n in counts.items())}; "
        f"leaderboard in {os.path.join(search.workdir, 'leaderboard.md')}", flush=True)
  if best is not None:
    print(f"best: {best.name}: {board.metric_label} {board.metric(best):.4f}", flush=True)
  if stop:
    print(f"stopped by {signal.Signals(stop[0]).name}; run the same command again to resume",
          flush=True)
    return 128 + stop[0]
  return int(failed > 0)


def _tell(search: Search, r: _Running) -> str:
  """Tells the study how the member of ``r`` ended; returns its status."""
  import optuna

  m, rc = r.member, r.proc.returncode
  pruned = os.path.join(m.workdir, PRUNED_FILE)
  with open(os.path.join(search.workdir, "attempts.jsonl"), "a") as f:
    f.write(json.dumps({"member": m.name, "started": round(r.started, 3),
                        "seconds": round(time.time() - r.started, 3), "returncode": rc}) + "\n")
  if rc == 0 and m.finished():
    board = Leaderboard(search.workdir, [m], search.eval_config.best_metric, "")
    m.status = "done"
    search.study.tell(m.index, board.metric(m))
  elif rc == 0 and os.path.exists(pruned):
    m.status, m.error = "pruned", ""
    search.study.tell(m.index, state=optuna.trial.TrialState.PRUNED)
  else:
    m.status = "failed"
    m.error = f"exit {rc}: {last_error(m.name, search.workdir)}"
    _trial(search.study, m.index).set_user_attr("error", m.error[:300])
    search.study.tell(m.index, state=optuna.trial.TrialState.FAIL)
  return m.status


def status(config_arg: str, base: dict[str, Any], workdir: str, spec: dict[str, Any]) -> int:
  """``--sweep_status`` of a search: one line per trial, and the leaderboard rewritten; returns 1
  when a trial failed, else 0."""
  from medjax.sweep.slurm import print_status

  search = Search(config_arg, base, workdir, spec)
  board = search.leaderboard()
  board.write()
  if not board.members:
    print(f"search: no trials yet in study {search.study.study_name}", flush=True)
    return 0
  print_status(board.members, board, None)
  return int(any(m.status == "failed" for m in board.members))


def submit(config_arg: str, base: dict[str, Any], workdir: str, spec: dict[str, Any],
           flag_settings: dict[str, Any], workers: int | None = None,
           launch_script: str | None = None) -> int:
  """``--sweep --sweep_backend=slurm`` for a search: a job array of ``workers`` tasks (default
  1), each a one-worker ``--sweep`` of the same search, drawing from the shared study."""
  import shlex
  import shutil

  from medjax.sweep.slurm import SlurmSettings
  from medjax.sweep.spec import load_spec, split_slurm

  search = Search(config_arg, base, workdir, spec)
  _, section = split_slurm(load_spec(config_arg))
  settings = SlurmSettings.from_sources(section, flag_settings)
  count = workers or 1
  if count < 1:
    raise SweepError(f"--sweep_workers must be >= 1, got {count}")
  folder = os.path.join(search.workdir, "slurm")
  os.makedirs(folder, exist_ok=True)
  cmd = [sys.executable, launch_script or default_launch_script(), f"--config={config_arg}",
         f"--workdir={search.workdir}", "--sweep", "--sweep_workers=1", *override_flags(base)]
  k = len([f for f in os.listdir(folder) if f.startswith("search-")])
  script = os.path.join(folder, f"search-{k}.sbatch")
  lines = ["#!/bin/bash", f"#SBATCH --job-name={os.path.basename(search.workdir)}",
           f"#SBATCH --array=0-{count - 1}", "#SBATCH --ntasks=1",
           f"#SBATCH --output={folder}/%A_%a.out", f"#SBATCH --chdir={os.getcwd()}",
           *[f"#SBATCH {w}" for w in settings.directives()],
           f"# Search {search.workdir}: each array task is one worker of the shared study "
           "(launch.py --sweep --sweep_backend=slurm wrote this).",
           f"exec {shlex.join(cmd)}", ""]
  atomic_write(script, "\n".join(lines))
  sbatch = shutil.which("sbatch")
  if sbatch is None:
    raise SweepError("sbatch not found: --sweep_backend=slurm submits with SLURM's sbatch, run it "
                     "on a machine of the cluster (or use the local backend)")
  out = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True)
  if out.returncode != 0:
    why = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise SweepError(f"sbatch refused {script}: {why}")
  print(f"search (slurm): {count} worker(s) as job array {out.stdout.strip().split(';')[0]} on "
        f"study {search.study.study_name} ({storage_label(search.s, search.workdir)}); their "
        "state: the same command with --sweep_status in place of --sweep", flush=True)
  return 0
