"""Running a sweep: members as launch.py processes, at most one per worker, resumable."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import IO, Any, Iterator

from medjax.io.atomic import atomic_write
from medjax.sweep.leaderboard import Leaderboard
from medjax.sweep.spec import (
  Member,
  Overrides,
  SweepError,
  check_members,
  expand,
  load_spec,
  member_names,
  override_flags,
  parse_config,
  split_slurm,
)
from medjax.sweep.workers import Worker, make_workers

_STOP_GRACE_S = 15  # how long stopped members get to exit before SIGKILL


def run(config_arg: str, base: Overrides, workdir: str, workers: int | None = None,
        launch_script: str | None = None, members_per_device: int = 1) -> int:
  """Runs the sweep declared by ``config_arg``'s ``get_sweep`` in ``workdir``.

  Args:
    config_arg: the ``--config`` value (``path.py`` or ``path.py:arg``); also passed to
      ``get_sweep``.
    base: ``--config.*`` overrides of the sweep command, applied to every member.
    workdir: the sweep folder; member ``name`` runs in ``workdir/name``.
    workers: members run at once (default: one per GPU, else 1).
    launch_script: the launch.py each member runs (default: the repository's).
    members_per_device: members sharing each GPU (`make_workers`).

  Returns:
    The exit status: 0 all finished, 1 a member failed, 128 + signal number when stopped.

  Raises:
    SweepError: before any member starts, for a sweep that cannot run as declared (or a
      workdir another sweep is running in).
  """
  launch_script = launch_script or default_launch_script()
  workdir = os.path.abspath(workdir)
  sweep = prepare(config_arg, base, workdir)
  members, eval_cfg = sweep.members, sweep.eval_config
  pool = make_workers(workers, members_per_device=members_per_device)

  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  with exclusive(workdir):
    write_manifest(sweep, config_arg, base)
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


def default_launch_script() -> str:
  """The repository's launch.py."""
  return os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch.py")


@dataclasses.dataclass
class Prepared:
  """A sweep parsed and checked, nothing run: its members (in ``workdir/<name>``), the eval
  settings that rank them, and the ``"slurm"`` entry of ``get_sweep()`` (``{}`` if none)."""
  workdir: str
  members: list[Member]
  eval_config: Any
  slurm: dict[str, Any]


def prepare(config_arg: str, base: Overrides, workdir: str) -> Prepared:
  """Expands and checks the sweep of ``config_arg`` (`SweepError` for a bad one)."""
  spec, slurm = split_slurm(load_spec(config_arg))
  overrides = expand(spec)
  names = member_names(overrides)
  configs = check_members(config_arg, base, overrides, names)
  eval_cfg = parse_config(config_arg, override_flags(base)).eval
  members = [Member(i, n, o, os.path.join(workdir, n), json.loads(c.to_json()))
             for i, (n, o, c) in enumerate(zip(names, overrides, configs))]
  return Prepared(workdir, members, eval_cfg, slurm)


def write_manifest(sweep: Prepared, config_arg: str, base: Overrides) -> None:
  """``sweep.json``: the config, the command's overrides and each member's exact overrides."""
  atomic_write(os.path.join(sweep.workdir, "sweep.json"), json.dumps({
      "config": config_arg, "overrides": base,
      "members": {m.name: m.overrides for m in sweep.members}}, indent=2, default=repr) + "\n")


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
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
    m.error = f"exit {rc}" + (f": {last_error(m.name, workdir)}" if rc else
                              ": its summary.json files were not written")
  with open(os.path.join(workdir, "attempts.jsonl"), "a") as f:
    f.write(json.dumps({"member": m.name, "started": round(r.started, 3),
                        "seconds": round(time.time() - r.started, 3), "returncode": rc,
                        "status": m.status}) + "\n")


def last_error(name: str, workdir: str) -> str:
  """The ``error: ...`` line of a member's log (launch.py's one-line errors), else its last."""
  with open(os.path.join(workdir, "logs", f"{name}.log"), errors="replace") as f:
    lines = [ln.strip() for ln in f.read().splitlines()[-200:] if ln.strip()]
  errors = [ln for ln in lines if ln.startswith("error: ")]
  return (errors or lines or ["(no output)"])[-1][:300]


def stop_members(running: list[_Running]) -> None:
  """SIGTERM to each running member's process group (launch.py saves and exits); SIGKILL to
  what is left after a grace."""
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


def _stop(running: list[_Running], workdir: str) -> None:
  """`stop_members`, then each one's end recorded as stopped."""
  stop_members(running)
  for r in running:
    _end(r, workdir, stopped=True)
