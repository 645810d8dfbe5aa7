r"""Sweeps on SLURM: the members as one job array of launch.py runs, submitted again until done.

  python launch.py --config configs/x.py --workdir runs/sweep --sweep --sweep_backend=slurm \
      [--slurm_partition=gpu --slurm_time=4:00:00 --slurm_gpus=1 --slurm_cpus=8 \
       --slurm_options="--account=lab --qos=normal"] [--sweep_workers=N]
  python launch.py --config configs/x.py --workdir runs/sweep --sweep_status

The submitting command returns once ``sbatch`` has the array: task ``i`` of the array is member
``i``, run by ``<workdir>/slurm/array-<k>.sbatch`` (one script per submission, there to read) as
``launch.py --workdir <workdir>/<member>``, its output appended to ``logs/<member>.log``.
``--sweep_workers=N`` caps how many run at once (``--array=...%N``). The sbatch settings come from
the flags, else from a ``"slurm"`` entry of the dict ``get_sweep`` returns (``{"partition": ...,
"time": ..., "cpus": ..., "gpus": ..., "mem": ..., "options": [...]}``), else SLURM's defaults
(1 CPU per member, no GPU).

Generated sbatch scripts rather than submitit: a member is a launch.py command, not a pickled
Python function, and the script shows exactly what runs; submitit's requeue-on-USR2 would
duplicate launch.py's own handling of SIGTERM. Each job is submitted with ``--requeue``: when
SLURM preempts or requeues it (``scontrol requeue``), it sends SIGTERM, launch.py saves at the
next step and exits 143 (`medjax.train.preemption`), and the requeued job resumes exactly from
that checkpoint. The script passes SIGTERM on to launch.py and, after it ends, appends the
attempt (exit status, wall time, job id) to ``attempts.jsonl``.

Re-running the submitting command skips finished members and members SLURM still holds (pending
or running), and submits the others: failed, cancelled, preempted and never submitted ones, which
resume from their checkpoints. ``--sweep_status`` prints each member's state (from the run's
files, ``squeue`` and ``attempts.jsonl``) and rewrites the leaderboard; it works for local sweeps
too (without the SLURM column).

For searches that choose members as results come in (ask, submit, wait, tell), `SlurmBackend`
takes members one batch at a time: ``submit(members)`` and ``states(members)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

from medjax.io.atomic import atomic_write
from medjax.sweep.leaderboard import Leaderboard
from medjax.sweep.running import Prepared, exclusive, last_error, prepare, write_manifest
from medjax.sweep.spec import Member, SweepError, override_flags
from medjax.sweep.workers import Worker, without_device_count

# squeue states of a job SLURM still holds: such a member is not submitted again.
_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
_STOPPED_RC = 143  # launch.py after SIGTERM, having saved a checkpoint


@dataclasses.dataclass
class SlurmSettings:
  """What each member's job asks SLURM for.

  Attributes:
    partition: ``--partition``; None: the cluster's default.
    time: ``--time`` (e.g. ``"4:00:00"``); None: the partition's default.
    cpus: ``--cpus-per-task`` of a member's one task.
    gpus: ``--gres=gpu:<gpus>``; 0: none asked.
    mem: ``--mem`` (e.g. ``"16G"``); None: the cluster's default.
    options: further sbatch options, each a word (``["--account=lab", "--qos=high"]``).
    max_running: members running at once (``--array=...%N``); None: no cap.
  """
  partition: str | None = None
  time: str | None = None
  cpus: int = 1
  gpus: int = 0
  mem: str | None = None
  options: list[str] = dataclasses.field(default_factory=list)
  max_running: int | None = None

  @classmethod
  def from_sources(cls, section: dict[str, Any], flag_values: dict[str, Any]) -> SlurmSettings:
    """The ``"slurm"`` entry of ``get_sweep()``'s dict, each field overridden by its flag where
    the flag is set (not None)."""
    if not isinstance(section, dict):
      raise SweepError(f"get_sweep()'s 'slurm' entry must be a dict, got {section!r}")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(section) - set(fields) - {"max_running"}
    if unknown:
      raise SweepError(f"get_sweep()'s 'slurm' entry has unknown fields {sorted(unknown)}; "
                       f"known: {sorted(set(fields) - {'max_running'})}")
    merged = dict(section)
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    if isinstance(merged.get("options"), str):
      merged["options"] = shlex.split(merged["options"])
    settings = cls(**merged)
    for name in ("cpus", "gpus"):
      v = getattr(settings, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "cpus" else 0):
        raise SweepError(f"slurm {name} must be an int >= {1 if name == 'cpus' else 0}, "
                         f"got {v!r}")
    if not (isinstance(settings.options, list) and all(isinstance(o, str) and o.startswith("-")
                                                       for o in settings.options)):
      raise SweepError(f"slurm options must be sbatch options like ['--account=lab'], got "
                       f"{settings.options!r}")
    return settings

  def directives(self) -> list[str]:
    words = [f"--cpus-per-task={self.cpus}"]
    words += [f"--partition={self.partition}"] if self.partition else []
    words += [f"--time={self.time}"] if self.time else []
    words += [f"--gres=gpu:{self.gpus}"] if self.gpus else []
    words += [f"--mem={self.mem}"] if self.mem else []
    return words + list(self.options)


class SlurmBackend:
  """Submits members of the sweep in ``workdir`` as job arrays and reads back their states.

  ``<workdir>/slurm/jobs.jsonl`` records every submission (array job id, members, script), so
  a later command (a re-run, ``--sweep_status``) finds each member's latest job.
  """

  def __init__(self, workdir: str, config_arg: str, base_flags: Sequence[str],
               settings: SlurmSettings, launch_script: str, env: dict[str, str] | None = None):
    self.workdir, self.config_arg = workdir, config_arg
    self.base_flags, self.settings = list(base_flags), settings
    self.launch_script = launch_script
    self.env = dict(os.environ if env is None else env)
    self.folder = os.path.join(workdir, "slurm")

  # -- submitting --------------------------------------------------------------------------------

  def submit(self, members: Sequence[Member]) -> str:
    """One job array for ``members`` (task ``i`` runs member ``i``); returns its job id."""
    os.makedirs(self.folder, exist_ok=True)
    os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
    k = len(self._submissions())
    script = os.path.join(self.folder, f"array-{k}.sbatch")
    atomic_write(script, self.script(members))
    sbatch = shutil.which("sbatch", path=self.env.get("PATH"))
    if sbatch is None:
      raise SweepError("sbatch not found: --sweep_backend=slurm submits with SLURM's sbatch, "
                       "run it on a machine of the cluster (or use the local backend)")
    out = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True,
                         env=self.env, cwd=os.getcwd())
    if out.returncode != 0:
      why = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise SweepError(f"sbatch refused {script}: {why}")
    job = out.stdout.strip().split(";")[0]
    with open(os.path.join(self.folder, "jobs.jsonl"), "a") as f:
      f.write(json.dumps({"job": job, "script": script, "submitted": round(time.time(), 3),
                          "members": {str(m.index): m.name for m in members}}) + "\n")
    return job

  def script(self, members: Sequence[Member]) -> str:
    """The sbatch script of one submission: a ``case`` over the array task id, one member each."""
    indices = ",".join(str(m.index) for m in members)
    cap = f"%{self.settings.max_running}" if self.settings.max_running else ""
    name = os.path.basename(self.workdir.rstrip("/")) or "sweep"
    header = [f"--job-name={name}", f"--array={indices}{cap}", "--ntasks=1", "--requeue",
              f"--output={self.folder}/%A_%a.out", "--open-mode=append",
              f"--chdir={os.getcwd()}", *self.settings.directives()]
    lines = ["#!/bin/bash"] + [f"#SBATCH {w}" for w in header] + [
        f"# Sweep {self.workdir}: array task i runs member i (launch.py --sweep "
        "--sweep_backend=slurm wrote this).",
        "set -u", 'case "$SLURM_ARRAY_TASK_ID" in']
    for m in members:
      cmd = [sys.executable, self.launch_script, f"--config={self.config_arg}",
             f"--workdir={m.workdir}", *self.base_flags, *override_flags(m.overrides)]
      lines += [f"  {m.index}) name={shlex.quote(m.name)}; "
                f"export XLA_FLAGS={shlex.quote(self._xla_flags(m))}",
                f"     cmd=({shlex.join(cmd)}) ;;"]
    log = shlex.quote(os.path.join(self.workdir, "logs"))
    attempts = shlex.quote(os.path.join(self.workdir, "attempts.jsonl"))
    lines += ['  *) echo "no member for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
              f'log={log}/"$name".log',
              'job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
              'echo "$ ${cmd[*]}  (SLURM job $job, restart ${SLURM_RESTART_COUNT:-0})" >> "$log"',
              "start_ns=$(date +%s%N)",
              "# SLURM signals every process of the job (cancel, requeue, preemption, time "
              "limit); the trap",
              "# keeps this script alive to record the attempt once launch.py has saved and "
              "ended.",
              "pid=''",
              "trap '[ -n \"$pid\" ] && kill -TERM \"$pid\" 2>/dev/null' TERM",
              '"${cmd[@]}" >> "$log" 2>&1 &',
              "pid=$!",
              "# wait returns early when the trap runs; the last wait collects the true status (or",
              "# says 127: an earlier one had it).",
              'wait "$pid"; rc=$?',
              'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done',
              'wait "$pid" 2>/dev/null; last=$?; [ "$last" -ne 127 ] && rc=$last',
              "ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))",
              'seconds="$((ms / 1000)).$(printf %03d $((ms % 1000)))"',
              "started=$((start_ns / 1000000000))",
              'case $rc in 0) st=done ;; 143) st=stopped ;; *) st=failed ;; esac',
              "printf '{\"member\": \"%s\", \"started\": %s, \"seconds\": %s, \"returncode\": %d, "
              "\"status\": \"%s\", \"job\": \"%s\"}\\n' \"$name\" \"$started\" \"$seconds\" "
              f"\"$rc\" \"$st\" \"$job\" >> {attempts}",
              "exit $rc", ""]
    return "\n".join(lines)

  def _xla_flags(self, m: Member) -> str:
    """The member's ``XLA_FLAGS``: as a local sweep worker's with ``cpus`` cores (one host device
    where medjax's CPU kernels run, else as many as divide its batches), none set on GPUs."""
    env = without_device_count(self.env)
    if self.settings.gpus:
      return env["XLA_FLAGS"]
    return Worker(env, None, self.settings.cpus, "").member_env(m.config)["XLA_FLAGS"]

  # -- reading back ------------------------------------------------------------------------------

  def _submissions(self) -> list[dict[str, Any]]:
    path = os.path.join(self.folder, "jobs.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(ln) for ln in f if ln.strip()]

  def latest_jobs(self) -> dict[str, str]:
    """Each submitted member's latest job, ``"<array job>_<member index>"``, by member name."""
    jobs = {}
    for s in self._submissions():
      for index, name in s["members"].items():
        jobs[name] = f"{s['job']}_{index}"
    return jobs

  def queue(self) -> dict[str, str]:
    """SLURM's state of each of this sweep's jobs that it still lists, by ``"<array>_<task>"``."""
    squeue = shutil.which("squeue", path=self.env.get("PATH"))
    arrays = sorted({s["job"] for s in self._submissions()})
    if not arrays or squeue is None:
      return {}
    # Listed by user rather than by job id: squeue refuses a list with a job it has forgotten.
    out = subprocess.run([squeue, "--noheader", "--array", "--states=all", "--me",
                          "--format=%F %K %T"], capture_output=True, text=True, env=self.env)
    states = {}
    for line in out.stdout.splitlines():
      parts = line.split()
      if len(parts) == 3 and parts[0] in arrays:
        states[f"{parts[0]}_{parts[1]}"] = parts[2]
    return states

  def states(self, members: Sequence[Member]) -> dict[str, tuple[str, str]]:
    """Sets each member's ``status`` (and ``error``) from its files, SLURM and its attempts;
    returns each member's latest job and SLURM's state of it (``""``: none, or forgotten), by
    name.

    Statuses: ``done`` (its run finished), ``pending``/``running`` (SLURM holds its job, or it
    was never submitted: pending), ``stopped`` (its last attempt saved and exited on SIGTERM:
    cancelled or preempted), ``failed`` (its last attempt failed).
    """
    jobs, queue, attempts = self.latest_jobs(), self.queue(), last_attempts(self.workdir)
    found = {}
    for m in members:
      job = jobs.get(m.name, "")
      state = queue.get(job, "")
      found[m.name] = (job, state)
      if m.finished():
        m.status, m.error = "done", ""
      elif state in _ACTIVE:
        m.status = "running" if state in ("RUNNING", "COMPLETING", "SIGNALING") else "pending"
        m.error = ""
      else:
        _from_attempt(m, attempts.get(m.name), self.workdir, state if job else None)
    return found


def last_attempts(workdir: str) -> dict[str, dict[str, Any]]:
  """The last recorded attempt of each member (``attempts.jsonl``), by name."""
  last = {}
  path = os.path.join(workdir, "attempts.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for ln in f:
        try:
          a = json.loads(ln)
          last[a["member"]] = a
        except (ValueError, KeyError, TypeError):
          continue  # a line cut short by a killed job
  return last


def _from_attempt(m: Member, attempt: dict[str, Any] | None, workdir: str,
                  state: str | None) -> None:
  """A member neither finished nor held by SLURM: its status from its last attempt. ``state``:
  SLURM's last word on its job (``""``: forgotten), None where it has none (local, or never
  submitted)."""
  if attempt is None:
    m.status = "pending" if state is None else "stopped"
    m.error = "" if state is None else f"its job ended ({state or 'gone'}) before launch.py ran"
  elif attempt.get("returncode") == _STOPPED_RC or attempt.get("status") == "stopped":
    m.status = "stopped"
    m.error = f"stopped by SIGTERM{f' (job {state})' if state else ''}; it resumes when run again"
  else:
    m.status = "failed"
    m.error = f"exit {attempt.get('returncode')}: {last_error(m.name, workdir)}"


def print_status(members: Sequence[Member], board: Leaderboard,
                 jobs: dict[str, tuple[str, str]] | None) -> None:
  """One line per member (state, SLURM job, metric or error), then the leaderboard's path."""
  width = max(len(m.name) for m in members)
  counts: dict[str, int] = {}
  for m in members:
    counts[m.status] = counts.get(m.status, 0) + 1
    detail = (f"{board.metric_label} {board.metric(m):.4f}" if m.status == "done" else m.error)
    job_id, state = (jobs or {}).get(m.name, ("", ""))
    job = f"  job {job_id} {state or 'gone'}" if job_id else ""
    print(f"{m.name:<{width}}  {m.status:<8}{job}  {detail}".rstrip(), flush=True)
  summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
  print(f"sweep: {len(members)} members: {summary}; leaderboard in "
        f"{os.path.join(board.workdir, 'leaderboard.md')}", flush=True)


def submit(config_arg: str, base: dict[str, Any], workdir: str, flag_settings: dict[str, Any],
           workers: int | None = None, launch_script: str | None = None) -> int:
  """``--sweep --sweep_backend=slurm``: submits every member that is neither finished nor held
  by SLURM as one job array; returns the exit status (0; `SweepError` for a bad sweep or a
  refused submission)."""
  from medjax.sweep.running import default_launch_script

  workdir = os.path.abspath(workdir)
  sweep = prepare(config_arg, base, workdir)
  if workers is not None and workers < 1:
    raise SweepError(f"--sweep_workers must be >= 1, got {workers}")
  settings = SlurmSettings.from_sources(sweep.slurm, dict(flag_settings, max_running=workers))
  backend = SlurmBackend(workdir, config_arg, override_flags(base), settings,
                         launch_script or default_launch_script())
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  with exclusive(workdir):
    write_manifest(sweep, config_arg, base)
    found = backend.states(sweep.members)
    todo = [m for m in sweep.members
            if m.status != "done" and found[m.name][1] not in _ACTIVE]
    done = sum(m.status == "done" for m in sweep.members)
    line = (f"sweep (slurm): {len(sweep.members)} members in {workdir}; {done} finished, "
            f"{len(sweep.members) - done - len(todo)} pending or running in SLURM")
    if todo:
      job = backend.submit(todo)
      for m in todo:
        m.status, m.error = "pending", ""
      line += f"; submitted {len(todo)} as job array {job} ({' '.join(settings.directives())})"
    print(line, flush=True)
    Leaderboard(workdir, sweep.members, sweep.eval_config.best_metric,
                sweep.eval_config.split).write()
  print("their state: the same command with --sweep_status in place of --sweep; running this "
        "command again submits what failed or was stopped", flush=True)
  return 0


def status(config_arg: str, base: dict[str, Any], workdir: str) -> int:
  """``--sweep_status``: prints each member's state and rewrites the leaderboard; returns 1 when
  a member failed, else 0."""
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, "sweep.json")):
    raise SweepError(f"{workdir}: no sweep here (no sweep.json); start it with --sweep")
  sweep: Prepared = prepare(config_arg, base, workdir)
  on_slurm = os.path.exists(os.path.join(workdir, "slurm", "jobs.jsonl"))
  jobs = None
  if on_slurm:
    jobs = SlurmBackend(workdir, config_arg, [], SlurmSettings(), "").states(sweep.members)
  else:  # a local sweep: its files and recorded attempts (a member running now shows pending)
    attempts = last_attempts(workdir)
    for m in sweep.members:
      if m.finished():
        m.status = "done"
      elif m.name in attempts:
        _from_attempt(m, attempts[m.name], workdir, "")
  board = Leaderboard(workdir, sweep.members, sweep.eval_config.best_metric,
                      sweep.eval_config.split)
  board.write()
  print_status(sweep.members, board, jobs)
  return int(any(m.status == "failed" for m in sweep.members))
