r"""Hyper-parameter sweeps: each member of a config's ``get_sweep()`` trained by its own launch.py.

  python launch.py --config configs/x.py --workdir runs/sweep --sweep [--sweep_workers 2]

A config file declares its sweep beside ``get_config(arg)``. ``get_sweep(arg)`` returns one of:
  - a grid, ``{"optim.lr": [1e-3, 3e-3], "optim.weight_decay": [1e-4, 1e-2]}``: the product of
    the lists, the last key varying fastest. A value that is not a list is the same in every
    member.
  - a seeded random search, ``{"method": "random", "count": 6, "seed": 0, "space": {...}}``. The
    space maps each key to ``("loguniform", lo, hi)``, ``("uniform", lo, hi)``,
    ``("randint", lo, hi)`` (both ends included), ``("choice", [values])`` (a bare list means the
    same), or a fixed value. Sampled floats are rounded to 3 significant digits, which keeps names
    and flags short. Members are drawn in order from one seeded stream, so raising ``count``
    keeps the earlier members as they were.
  - a list of override dicts, big_vision's way of writing sweeps, taken as it is.
Keys are dotted config paths. Member ``i`` runs in ``<workdir>/<name>``, where the name is the
index followed by the member's overrides, e.g. ``m00_lr=0.001_wd=0.0001``. Multi-word keys are
shortened to their initials, and a key falls back to its full dotted path where two would clash.
``sweep.json`` maps each name to its exact overrides. A member runs as ``launch.py --config
<the same file> --config.<key>=<value> ...``, so its ``config.json`` records exactly what ran.
Every member is parsed before anything starts: an unknown key or a value of the wrong type stops
the sweep, with a message that names it.

Members finish in any order, at most ``--sweep_workers`` at a time. On CPU the default is 1
worker. Each worker is pinned to ``cores // workers`` cores, so the workers do not oversubscribe
the machine. Its member gets one XLA host device, whose oneDNN convolutions use those cores; where
oneDNN is unavailable, as many host devices as cores (``XLA_FLAGS``), or fewer where that count
does not divide the member's batch sizes. With CUDA GPUs (found by asking JAX in a
throwaway process) the default is one worker per GPU, and each worker gets ``gpus // workers``
of them through ``CUDA_VISIBLE_DEVICES``.

A member is finished when its run is (`medjax.train.runs.is_finished`: the training loop's
``summary.json``, and for segmentation launch.py's sliding-window validation's
``validation/summary.json``, each written last) and the config in its ``config.json`` is the
member's. Re-running the sweep command skips
finished members and restarts the others, and launch.py resumes those from their last
checkpoint. SIGINT or SIGTERM stops the running members. If the sweep process itself is killed,
its members get SIGTERM from the kernel (Linux ``PR_SET_PDEATHSIG``). Each member's output goes
to ``logs/<name>.log``, and ``attempts.jsonl`` records each attempt's wall time and exit status.
After each member ends, ``leaderboard.csv`` and ``leaderboard.md`` are rewritten. They rank the
members by ``eval.best_metric`` of their best checkpoint (higher is better) and mark the best.

Exit status: 0 when every member has finished; 1 when a member failed (the other members still
ran); 2 for a bad sweep, before anything runs; 128 + the signal number when stopped.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import difflib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from typing import IO, Any, Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from medjax.io.atomic import atomic_write
from medjax.train import runs

Overrides = dict[str, Any]

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")  # characters kept in a member's folder name
_MAX_NAME = 100
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")
_STOP_GRACE_S = 15  # how long stopped members get to exit before SIGKILL


class SweepError(ValueError):
  """A sweep that cannot run as declared (spec, keys, values, workers); raised before any member
  starts."""


# ---------------------------------------------------------------------------------------------
# Spec → members.
# ---------------------------------------------------------------------------------------------

def load_spec(config_arg: str) -> Any:
  """``get_sweep(arg)`` from the config file in ``config_arg`` (``path.py`` or ``path.py:arg``,
  as given to ``--config``)."""
  path, *arg = config_arg.split(":", 1)
  spec = importlib.util.spec_from_file_location("medjax_sweep_config", path)
  if spec is None or not os.path.exists(path):
    raise SweepError(f"{path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} has no get_sweep(); --sweep needs one beside get_config() "
                     "(formats: medjax/sweep.py)")
  return module.get_sweep(*arg)


def expand(spec: Any) -> list[Overrides]:
  """The members of a sweep spec (grid, random search or list; see the module docstring).

  Returns:
    One ``{dotted key: value}`` dict per member, in a fixed order.
  """
  if isinstance(spec, (list, tuple)):
    if not all(isinstance(m, dict) for m in spec):
      raise SweepError("a sweep given as a list must hold one {key: value} dict per member")
    members = [dict(m) for m in spec]
  elif isinstance(spec, dict) and "method" in spec:
    extra = set(spec) - {"method", "count", "seed", "space"}
    if extra:
      raise SweepError(f"unknown sweep fields {sorted(extra)}; a sweep with a method has "
                       "'method', 'space' and, for random, 'count' and 'seed'")
    space = spec.get("space")
    if spec["method"] == "grid":
      members = _grid(space)
    elif spec["method"] == "random":
      members = _random(space, spec.get("count"), spec.get("seed", 0))
    else:
      raise SweepError(f"unknown sweep method {spec['method']!r}; use 'grid' or 'random'")
  elif isinstance(spec, dict):
    members = _grid(spec)
  else:
    raise SweepError(f"get_sweep() returned a {type(spec).__name__}; expected a dict (grid or "
                     "random search) or a list of override dicts")
  if not members:
    raise SweepError("the sweep has no members")
  for m in members:
    for k in m:
      if not isinstance(k, str) or not k:
        raise SweepError(f"sweep keys are dotted config paths like 'optim.lr'; got {k!r}")
  return [{k: _plain(v) for k, v in m.items()} for m in members]


def _grid(space: Any) -> list[Overrides]:
  if not isinstance(space, dict) or not space:
    raise SweepError("a grid sweep maps config keys to lists of values, e.g. "
                     "{'optim.lr': [1e-3, 3e-3]}")
  axes = []
  for key, values in space.items():
    values = values.tolist() if hasattr(values, "tolist") else values  # numpy arrays
    values = values if isinstance(values, list) else [values]
    if not values:
      raise SweepError(f"sweep key {key!r} has an empty list of values")
    axes.append(values)
  return [dict(zip(space, combo)) for combo in itertools.product(*axes)]


def _random(space: Any, count: Any, seed: Any) -> list[Overrides]:
  if not isinstance(space, dict) or not space:
    raise SweepError("a random sweep needs a 'space': {key: distribution}")
  if not isinstance(count, int) or count < 1:
    raise SweepError(f"a random sweep needs 'count' >= 1, got {count!r}")
  rng = random.Random(seed)  # the stdlib generator: its stream is stable across versions
  return [{k: _draw(k, d, rng) for k, d in space.items()} for _ in range(count)]


def _draw(key: str, dist: Any, rng: random.Random) -> Any:
  if isinstance(dist, list):
    dist = ("choice", dist)
  if not (isinstance(dist, tuple) and dist and isinstance(dist[0], str)):
    return dist  # a fixed value
  name, *args = dist
  if name == "choice" and len(args) == 1 and len(args[0]) > 0:
    return rng.choice(list(args[0]))
  if name in ("uniform", "loguniform", "randint") and len(args) == 2:
    lo, hi = args
    if name == "randint" and isinstance(lo, int) and isinstance(hi, int) and lo <= hi:
      return rng.randint(lo, hi)
    if name == "uniform" and lo <= hi:
      return _round(rng.uniform(lo, hi))
    if name == "loguniform" and 0 < lo <= hi:
      return _round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
  raise SweepError(f"sweep key {key!r}: {dist!r} is not a distribution; use ('choice', [values])"
                   ", ('uniform', lo, hi), ('loguniform', lo, hi) with 0 < lo <= hi, or "
                   "('randint', lo, hi) with ints (a fixed tuple value goes in a choice)")


def _round(x: float) -> float:
  return float(f"{x:.3g}")


def _plain(v: Any) -> Any:
  """numpy scalars as Python ones: their repr (``np.float64(0.1)``) is no command-line value."""
  if not isinstance(v, (str, bytes)) and hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
    return v.item()
  return v


def member_names(members: Sequence[Overrides]) -> list[str]:
  """Stable folder names, e.g. ``m00_lr=0.001_wd=0.0001``: the index keeps them unique, and the
  values are there for people. The names depend only on the members, so a re-run finds the same
  folders."""
  keys = list(dict.fromkeys(k for m in members for k in m))
  short = {k: _initials(k.rsplit(".", 1)[-1]) for k in keys}
  counts = {s: list(short.values()).count(s) for s in short.values()}
  short = {k: (k if counts[s] > 1 else s) for k, s in short.items()}
  width = max(2, len(str(len(members) - 1)))
  names = []
  for i, m in enumerate(members):
    parts = [f"m{i:0{width}d}"] + [f"{short[k]}={_format(v)}" for k, v in m.items()]
    names.append(_UNSAFE.sub("-", "_".join(parts))[:_MAX_NAME])
  return names


def _initials(word: str) -> str:
  parts = [p for p in word.split("_") if p]
  return "".join(p[0] for p in parts) if len(parts) > 1 else word


def _format(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# Members → checked configs and launch flags.
# ---------------------------------------------------------------------------------------------

def override_flags(overrides: Overrides) -> list[str]:
  """``--config.<key>=<value>`` flags that launch.py parses back into exactly ``overrides``."""
  out = []
  for k, v in overrides.items():
    if isinstance(v, ml_collections.ConfigDict):
      v = v.to_dict()
    out.append(f"--config.{k}={v if isinstance(v, str) else repr(v)}")
  return out


def parse_config(config_arg: str, flag_list: Sequence[str]) -> ml_collections.ConfigDict:
  """The locked config that ``launch.py --config <config_arg> <flag_list>`` would train."""
  argv = ["launch.py", f"--config={config_arg}", *flag_list]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True,
                                           sys_argv=argv)
  with warnings.catch_warnings():  # ml_collections loads the file with the old load_module()
    warnings.simplefilter("ignore", DeprecationWarning)
    values(argv)
  return holder.value


def check_members(config_arg: str, base: Overrides, members: Sequence[Overrides],
                  names: Sequence[str]) -> list[ml_collections.ConfigDict]:
  """Parses every member's config as its launch.py will, before anything runs.

  Args:
    config_arg: the ``--config`` value (``path.py`` or ``path.py:arg``).
    base: the sweep command's own ``--config.*`` overrides, applied to every member.
    members: the members' overrides.
    names: the members' names, for messages.

  Returns:
    Each member's config.

  Raises:
    SweepError: naming the key of an unknown key, a value of the wrong type, or a key both swept
      and set on the command line.
  """
  base_config = parse_config(config_arg, override_flags(base))
  for m, name in zip(members, names):
    for key in m:
      if key in base:
        raise SweepError(f"{key} is swept and also set by --config.{key}; drop one of them")
      if not _has_key(base_config, key):
        close = difflib.get_close_matches(key, list(_flat_keys(base_config)), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SweepError(f"sweep key {key!r} (member {name}) is not in the config of "
                         f"{config_arg}{hint}")
  configs = []
  for m, name in zip(members, names):
    try:
      c = parse_config(config_arg, override_flags(base) + override_flags(m))
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as e:
      raise SweepError(f"member {name}: {e}") from None
    for key, want in m.items():
      got = _get(c, key)
      got = got.to_dict() if isinstance(got, ml_collections.ConfigDict) else got
      if got != want or isinstance(got, bool) != isinstance(want, bool):
        raise SweepError(f"sweep key {key!r} (member {name}): {want!r} reaches the config as "
                         f"{got!r}; give a value of the field's type")
    configs.append(c)
  return configs


def _has_key(config: ml_collections.ConfigDict, key: str) -> bool:
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  for k in config:
    v = config[k]
    yield prefix + k
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_keys(v, f"{prefix}{k}.")


# ---------------------------------------------------------------------------------------------
# Workers: one environment (and core set) per concurrently running member.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Worker:
  """Where one member at a time runs.

  Attributes:
    env: its environment (on GPUs with ``CUDA_VISIBLE_DEVICES`` set).
    cores: the cores it is pinned to; None: not pinned.
    host_devices: at most this many XLA host devices per member (CPU); None on GPUs.
    label: for people.
  """
  env: dict[str, str] = dataclasses.field(repr=False)
  cores: set[int] | None
  host_devices: int | None
  label: str

  def member_env(self, config: dict[str, Any]) -> dict[str, str]:
    """The environment of a member with ``config`` (its config.json). On CPU: one host device
    where oneDNN's convolutions thread over the worker's cores (as ``medjax.host``), else the
    most host devices, up to ``host_devices``, that divide both of its batch sizes."""
    if self.host_devices is None:
      return dict(self.env)
    from medjax.models import onednn  # imports JAX, whose CPU client stays unstarted here
    batch = math.gcd(config["train"]["batch_size"], config["eval"]["batch_size"])
    n = 1 if onednn.available() else max(d for d in range(1, self.host_devices + 1)
                                         if batch % d == 0)
    xla = self.env.get("XLA_FLAGS", "").split() + [f"--xla_force_host_platform_device_count={n}"]
    return dict(self.env, XLA_FLAGS=" ".join(xla))


def make_workers(count: int | None, env: dict[str, str] | None = None) -> list[Worker]:
  """``count`` workers (default: one per GPU, else 1) over the visible GPUs or CPU cores."""
  env = dict(os.environ if env is None else env)
  if count is not None and count < 1:
    raise SweepError(f"--sweep_workers must be >= 1, got {count}")
  gpus = visible_gpus(env)
  if gpus:
    count = count or len(gpus)
    if count > len(gpus):
      raise SweepError(f"--sweep_workers={count} but {len(gpus)} GPU(s) are visible; members run "
                       "one process per GPU (or several GPUs each), never two on one GPU")
    per = len(gpus) // count
    groups = [gpus[i * per:(i + 1) * per] for i in range(count)]
    return [Worker(dict(env, CUDA_VISIBLE_DEVICES=",".join(g)), None, None, f"GPU {','.join(g)}")
            for g in groups]
  count = count or 1
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
      list(range(os.cpu_count() or 1))
  per = max(1, len(cores) // count)
  worker_env = dict(env, XLA_FLAGS=_DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).strip())
  pin = hasattr(os, "sched_setaffinity") and len(cores) >= count
  workers = []
  for i in range(count):
    mine = set(cores[i * per:(i + 1) * per]) if pin else None
    where = f"cores {sorted(mine)}" if mine else "all cores"
    workers.append(Worker(dict(worker_env), mine, per, f"up to {per} CPU device(s), {where}"))
  return workers


def visible_gpus(env: dict[str, str]) -> list[str]:
  """``CUDA_VISIBLE_DEVICES`` entries of the GPUs JAX would use; ``[]`` on a CPU-only setup.

  JAX is asked in a throwaway process: initialised here, it would hold a context (and, by default,
  75% of the memory) on every GPU for the whole sweep.
  """
  platforms = [p for p in env.get("JAX_PLATFORMS", "").split(",") if p]
  if platforms and not {"cuda", "gpu"} & set(platforms):
    return []
  if not (importlib.metadata.entry_points(group="jax_plugins") or
          importlib.util.find_spec("jax_plugins")):
    return []  # no accelerator plugin installed: CPU jaxlib only
  code = "import jax; print(sum(d.platform == 'gpu' for d in jax.local_devices()))"
  try:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false"), timeout=600,
                         check=True)
    n = int(out.stdout.split()[-1])
  except (subprocess.SubprocessError, OSError, ValueError, IndexError):
    return []
  visible = env.get("CUDA_VISIBLE_DEVICES")
  ids = [v for v in visible.split(",") if v] if visible else [str(i) for i in range(n)]
  return ids[:n]


# ---------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Member:
  """One sweep member: its overrides, its run folder, and what became of it."""
  index: int
  name: str
  overrides: Overrides
  workdir: str
  config: dict[str, Any]  # the config.json its run writes
  status: str = "pending"  # pending | running | done | failed | stopped
  error: str = ""

  def finished(self) -> bool:
    """Whether its run ended (`runs.is_finished`) with this member's config."""
    try:
      with open(os.path.join(self.workdir, "config.json")) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      return False
    return saved == self.config and runs.is_finished(self.workdir, saved)


def run(config_arg: str, base: Overrides, workdir: str, workers: int | None = None,
        launch_script: str | None = None) -> int:
  """Runs the sweep declared by ``config_arg``'s ``get_sweep`` in ``workdir``.

  Args:
    config_arg: the ``--config`` value (``path.py`` or ``path.py:arg``); also passed to
      ``get_sweep``.
    base: ``--config.*`` overrides of the sweep command, applied to every member.
    workdir: the sweep folder; member ``name`` runs in ``workdir/name``.
    workers: members run at once (default: one per GPU, else 1).
    launch_script: the launch.py each member runs (default: the repository's).

  Returns:
    The exit status: 0 all finished, 1 a member failed, 128 + signal number when stopped.

  Raises:
    SweepError: before any member starts, for a sweep that cannot run as declared (or a
      workdir another sweep is running in).
  """
  launch_script = launch_script or os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")
  workdir = os.path.abspath(workdir)
  overrides = expand(load_spec(config_arg))
  names = member_names(overrides)
  configs = check_members(config_arg, base, overrides, names)
  pool = make_workers(workers)
  eval_cfg = parse_config(config_arg, override_flags(base)).eval
  members = [Member(i, n, o, os.path.join(workdir, n), json.loads(c.to_json()))
             for i, (n, o, c) in enumerate(zip(names, overrides, configs))]

  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  with _exclusive(workdir):
    _write_json(os.path.join(workdir, "sweep.json"), {
        "config": config_arg, "overrides": base,
        "members": {m.name: m.overrides for m in members}})
    todo = []
    for m in members:
      if m.finished():
        m.status = "done"
      else:
        todo.append(m)
    print(f"sweep: {len(members)} members in {workdir}; {len(members) - len(todo)} finished "
          f"already; {len(pool)} worker(s): {'; '.join(w.label for w in pool)}", flush=True)
    board = Leaderboard(workdir, members, eval_cfg.best_metric, eval_cfg.split)
    base_cmd = [sys.executable, launch_script, f"--config={config_arg}"]
    signum = _run_members(todo, pool, base_cmd, override_flags(base), workdir, board)
    best = board.write()

  failed = [m for m in members if m.status == "failed"]
  where = os.path.join(workdir, "leaderboard.md")
  if best is not None:
    print(f"best: {best.name}: {board.metric_label} {board.metric(best):.4f}; leaderboard in "
          f"{where}", flush=True)
  if signum:
    left = [m.name for m in members if m.status != "done"]
    print(f"stopped by {signal.Signals(signum).name}; unfinished: {', '.join(left)}. Run the same "
          "command again to resume.", flush=True)
    return 128 + signum
  if failed:
    print(f"error: {len(failed)} of {len(members)} members failed: "
          f"{', '.join(m.name for m in failed)} (their output: {workdir}/logs/)",
          file=sys.stderr, flush=True)
    return 1
  return 0


@contextlib.contextmanager
def _exclusive(workdir: str) -> Iterator[None]:
  """Holds ``workdir/.sweep.lock``: two sweeps in one folder would train a member twice at once.
  The kernel drops the lock when this process ends, however it ends."""
  import fcntl

  f = open(os.path.join(workdir, ".sweep.lock"), "a+")
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise SweepError(f"another sweep (pid {f.read().strip() or '?'}) is running in "
                       f"{workdir}") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    yield
  finally:
    f.close()


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _child_setup(cores: set[int] | None, parent: int):
  """Runs in each member's process before launch.py: SIGTERM when the sweep dies, and pinning."""
  def setup():
    if _libc is not None:
      # Tied to the thread that started the child: members are started from the main thread.
      _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
      if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(1)
    if cores:
      os.sched_setaffinity(0, cores)
  return setup


@dataclasses.dataclass
class _Running:
  member: Member
  proc: subprocess.Popen
  started: float
  log: IO[str]


def _run_members(todo: list[Member], pool: list[Worker], base_cmd: list[str],
                 base_flags: list[str], workdir: str, board: Leaderboard) -> int:
  """Runs ``todo`` on the workers until done or signalled; returns the signal number or 0."""
  stop: list[int] = []
  handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
              for s in (signal.SIGINT, signal.SIGTERM)}
  queue, running = list(todo), {}
  try:
    while (queue or running) and not stop:
      for w, worker in enumerate(pool):
        if w not in running and queue and not stop:
          running[w] = _start(queue.pop(0), worker, base_cmd, base_flags, workdir)
          print(f"start: {running[w].member.name} ({worker.label})", flush=True)
      for w, r in list(running.items()):
        if r.proc.poll() is None:
          continue
        del running[w]
        _end(r, workdir)
        line = f"{r.member.status}: {r.member.name} in {time.time() - r.started:.0f} s"
        if r.member.status == "done":
          line += f": {board.metric_label} {board.metric(r.member):.4f}"
        else:
          line += f": {r.member.error} (log: {workdir}/logs/{r.member.name}.log)"
        print(line, flush=True)
        board.write()
      time.sleep(0.2)
  finally:
    _stop(list(running.values()), workdir)
    for s, h in handlers.items():
      signal.signal(s, h)
  return stop[0] if stop else 0


def _start(m: Member, worker: Worker, base_cmd: list[str], base_flags: list[str],
           workdir: str) -> _Running:
  cmd = [*base_cmd, f"--workdir={m.workdir}", *base_flags, *override_flags(m.overrides)]
  log = open(os.path.join(workdir, "logs", f"{m.name}.log"), "a")
  log.write(f"$ {shlex.join(cmd)}\n")
  log.flush()
  proc = subprocess.Popen(cmd, env=worker.member_env(m.config), stdout=log,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          start_new_session=True,
                          preexec_fn=_child_setup(worker.cores, os.getpid()))
  m.status, m.error = "running", ""
  return _Running(m, proc, time.time(), log)


def _end(r: _Running, workdir: str, stopped: bool = False) -> None:
  """Records a member's exit: its status, error line and this attempt's wall time."""
  r.log.close()
  m, rc = r.member, r.proc.returncode
  if stopped:
    m.status = "stopped"
  elif rc == 0 and m.finished():
    m.status = "done"
  else:
    m.status = "failed"
    m.error = f"exit {rc}" + (f": {_last_error(m.name, workdir)}" if rc else
                              ": its summary.json files were not written")
  with open(os.path.join(workdir, "attempts.jsonl"), "a") as f:
    f.write(json.dumps({"member": m.name, "started": round(r.started, 3),
                        "seconds": round(time.time() - r.started, 3), "returncode": rc,
                        "status": m.status}) + "\n")


def _last_error(name: str, workdir: str) -> str:
  """The ``error: ...`` line of a member's log (launch.py's one-line errors), else its last."""
  with open(os.path.join(workdir, "logs", f"{name}.log"), errors="replace") as f:
    lines = [ln.strip() for ln in f.read().splitlines()[-200:] if ln.strip()]
  errors = [ln for ln in lines if ln.startswith("error: ")]
  return (errors or lines or ["(no output)"])[-1][:300]


def _stop(running: list[_Running], workdir: str) -> None:
  """SIGTERM to each running member's process group; SIGKILL to what is left after a grace."""
  for r in running:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(r.proc.pid, signal.SIGTERM)
  deadline = time.monotonic() + _STOP_GRACE_S
  for r in running:
    try:
      r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(r.proc.pid, signal.SIGKILL)
      r.proc.wait()
    _end(r, workdir, stopped=True)


# ---------------------------------------------------------------------------------------------
# Leaderboard.
# ---------------------------------------------------------------------------------------------

class Leaderboard:
  """``leaderboard.csv`` / ``leaderboard.md``: members ranked by the best checkpoint's metric.

  Args:
    workdir: the sweep folder.
    members: every member of the sweep, in order.
    best_metric: ``eval.best_metric``; higher is better, as in checkpoint selection, and a tie
      goes to the member with the lower index.
    split: ``eval.split``, the split the metric is measured on.
  """

  def __init__(self, workdir: str, members: Sequence[Member], best_metric: str, split: str):
    self.workdir, self.members = workdir, list(members)
    self.best_metric, self.split = best_metric, split
    self.metric_label = f"{split}_{best_metric}"

  def summary(self, m: Member) -> dict[str, Any] | None:
    if m.status != "done":
      return None
    return runs.read_summary(m.workdir)

  def metric(self, m: Member) -> float:
    s = self.summary(m)
    v = (s or {}).get("best", {}).get(self.best_metric)
    return float(v) if isinstance(v, (int, float)) else math.nan

  def wall_seconds(self) -> dict[str, float]:
    """Each member's wall time over all its attempts (an attempt cut short by SIGKILL of the
    sweep is not recorded)."""
    total: dict[str, float] = {}
    path = os.path.join(self.workdir, "attempts.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        for ln in f:
          with contextlib.suppress(ValueError, KeyError):
            a = json.loads(ln)
            total[a["member"]] = total.get(a["member"], 0.0) + a["seconds"]
    return total

  def write(self) -> Member | None:
    """Rewrites both files; returns the best finished member, if any."""
    scored = [(m, self.metric(m)) for m in self.members if self.summary(m) is not None]
    ranked = sorted(scored, key=lambda p: (math.isnan(p[1]), -p[1] if p[1] == p[1] else 0,
                                           p[0].index))
    rank = {m.name: i + 1 for i, (m, _) in enumerate(ranked)}
    best = ranked[0][0] if ranked and not math.isnan(ranked[0][1]) else None
    order = [m for m, _ in ranked] + [m for m in self.members if m.name not in rank]
    keys = list(dict.fromkeys(k for m in self.members for k in m.overrides))
    others = sorted({k for m in order for k in ((self.summary(m) or {}).get("best") or {})} -
                    {self.best_metric})
    wall = self.wall_seconds()
    header = (["rank", "member", "best", "status", self.metric_label] +
              [f"{self.split}_{k}" for k in others] +
              ["best_step", "steps", "wall_seconds"] + keys + ["error"])
    rows = []
    for m in order:
      s = self.summary(m) or {}
      metrics = s.get("best") or {}
      rows.append([rank.get(m.name, ""), m.name, int(m is best), m.status,
                   metrics.get(self.best_metric, "")] + [metrics.get(k, "") for k in others] +
                  [s.get("best_step", ""), s.get("steps", ""),
                   round(wall[m.name], 1) if m.name in wall else ""] +
                  [m.overrides.get(k, "") for k in keys] + [m.error])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header] + rows)
    _write_text(os.path.join(self.workdir, "leaderboard.csv"), text.getvalue())
    _write_text(os.path.join(self.workdir, "leaderboard.md"), self._markdown(header, rows, best))
    return best

  def _markdown(self, header: list[str], rows: list[list[Any]], best: Member | None) -> str:
    done = sum(m.status == "done" for m in self.members)
    lines = [f"# Sweep leaderboard: {os.path.basename(self.workdir)}", "",
             f"{done} of {len(self.members)} members finished, ranked by `{self.metric_label}` of "
             "each member's best checkpoint (higher is better). Each member's run, with its "
             "`results.md`, is in the folder of its name; its output is in `logs/`.", ""]
    if best is not None:
      lines += [f"Best: **{best.name}**.", ""]
    cols = [c for c in header if c not in ("best", "error")]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
      cells = dict(zip(header, row))
      if cells["best"]:
        cells["member"] = f"**{cells['member']}** (best)"
      lines.append("| " + " | ".join(self._md_cell(c, cells[c]) for c in cols) + " |")
    errors = [(row[1], row[-1]) for row in rows if row[-1]]
    if errors:
      lines += ["", "Failures:", ""] + [f"- {n}: `{e}`" for n, e in errors]
    return "\n".join(lines) + "\n"

  def _md_cell(self, column: str, v: Any) -> str:
    if isinstance(v, float) and column.startswith(f"{self.split}_"):
      return f"{v:.4f}"  # metrics as results.md prints them; overrides exactly
    return str(v).replace("|", "\\|")


def _write_text(path: str, text: str) -> None:
  atomic_write(path, text)


def _write_json(path: str, obj: Any) -> None:
  atomic_write(path, json.dumps(obj, indent=2, default=repr) + "\n")
