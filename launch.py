r"""Entry point: ``python launch.py --config configs/x.py --workdir runs/x [--config.a.b=v]``.

Deliberately small (as in flax's examples): parse flags, start multi-process JAX when asked, and
call ``medjax.train.loop.train_and_evaluate``. Config overrides are locked: a key the config does
not have, or a value of the wrong type, stops here with a message that names it.

Several processes (one per host, or one per GPU) join one run by themselves under SLURM's srun,
Open MPI's mpirun (4.x) or on a TPU pod (`medjax.host.find_cluster`), or with flags elsewhere:
  srun --ntasks=2 python launch.py --config configs/x.py --workdir runs/x
  python launch.py ... --coordinator=127.0.0.1:1234 --num_processes=2 --process_id=0
Every process prints one ``cluster: ...`` line at start: the cluster found, its index, devices.

Sweeps (``get_sweep()`` beside ``get_config()``; see medjax/sweep/): every member as its own
launch.py process, at most N at a time, skipping finished members and resuming the others; or
every member as one task of a SLURM job array (medjax/sweep/slurm.py); an Optuna search whose
trials any number of such commands share, pruning members from their evaluations
(medjax/sweep/search.py); and the sweep's state:
  python launch.py --config configs/x.py --workdir runs/sweep --sweep [--sweep_workers N]
  python launch.py --config configs/x.py --workdir runs/sweep --sweep --sweep_backend=slurm
  python launch.py --config configs/x.py --workdir runs/sweep --sweep_status

One run per workdir: a second launch.py on a workdir in use (a sweep root included) is refused;
a lock left by a run that died is taken over, with a line saying so (medjax/train/workdir_lock.py).

Exit status: 0 done; 2 an expected error (bad data file, bad setting or ``--config.`` override,
a workdir of another experiment or in use by another run, a diverged run, a full disk, no intact
checkpoint to resume from), printed as one ``error: ...`` line on stderr; 143 (128 + SIGTERM)
stopped by SIGTERM, as SLURM and spot machines preempt, after saving a checkpoint at the step
boundary: the same command resumes exactly (SLURM's --requeue requeues a preempted job whatever
its status, and submitit from its own USR2 handler; 143 keeps `launch.py && next` from going on);
1 anything else (other bad flags, or a bug, which keeps its traceback).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

from medjax import host

host.prepare()  # before JAX starts (see medjax/host.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, logs, plots).")
_COORDINATOR = flags.DEFINE_string("coordinator", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every member of the config's get_sweep(), each "
                           "as its own launch.py in <workdir>/<member>.")
_SWEEP_WORKERS = flags.DEFINE_integer("sweep_workers", None, "Sweep members run at once (default: "
                                      "one per GPU, else 1).")
_MEMBERS_PER_DEVICE = flags.DEFINE_integer("members_per_device", 1, "Sweep members sharing each "
                                           "GPU (memory preallocation off for them); local "
                                           "backend only.")
_SWEEP_BACKEND = flags.DEFINE_enum("sweep_backend", "local", ["local", "slurm"], "Where --sweep "
                                   "runs its members: local processes, or a SLURM job array.")
_SWEEP_STATUS = flags.DEFINE_bool("sweep_status", False, "Print the state of the sweep in "
                                  "--workdir (local or SLURM) and rewrite its leaderboard.")
_SLURM_PARTITION = flags.DEFINE_string("slurm_partition", None, "SLURM sweep: --partition.")
_SLURM_TIME = flags.DEFINE_string("slurm_time", None, "SLURM sweep: --time of each member.")
_SLURM_CPUS = flags.DEFINE_integer("slurm_cpus", None, "SLURM sweep: CPUs per member (1).")
_SLURM_GPUS = flags.DEFINE_integer("slurm_gpus", None, "SLURM sweep: GPUs per member (0).")
_SLURM_MEM = flags.DEFINE_string("slurm_mem", None, "SLURM sweep: --mem of each member.")
_SLURM_OPTIONS = flags.DEFINE_string("slurm_options", None, "SLURM sweep: further sbatch "
                                     "options, e.g. '--account=lab --qos=high'.")
flags.mark_flags_as_required(["config", "workdir"])


def _is_expected_error(e: BaseException) -> bool:
  """Whether ``e`` is the user's to fix: one ``error:`` line, not a traceback
  (`medjax.io.errors.is_users_error`)."""
  from medjax.io.errors import is_users_error

  return is_users_error(e)


def _override_error(e: BaseException, argv: Sequence[str]) -> str | None:
  """The one-line message for ``e``, raised by absl's parsing of ``argv``, when a ``--config.``
  override caused it (a key the config does not have, a value of the wrong type); else None.

  ml_collections (1.1) raises a ``flags.Error`` ``"flag --config.k=v: <why>"`` for a wrongly typed
  value, but a bare KeyError/AttributeError (``'k'`` and maybe ``Did you mean "x"``) from inside
  the locked ConfigDict for an unknown key, naming only the last part of the path; the full
  path is the override in ``argv`` that has that part.
  """
  if isinstance(e, flags.Error):
    m = re.fullmatch(r"flag --(config\.[^=\s]+)=(.*?): (.*)", str(e), re.S)
    return m and f"--{m[1]}={m[2]}: not a valid value for this setting ({m[3]})"
  if not isinstance(e, (KeyError, AttributeError)) or not _raised_in(e, "ml_collections"):
    return None
  text = str(e)
  m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  word = re.search(r"[\w-]+", text)
  missing, suggestion = (m[2], m[1]) if m else (word[0] if word else "?", None)
  overrides = [re.sub(r"^--?(no)?config\.", "", a.split("=", 1)[0]) for a in argv
               if re.match(r"--?(no)?config\.", a)]
  paths = [o for o in overrides if missing in o.split(".")]
  if len(paths) != 1:
    return f"--config.{missing}: the config has no such setting"
  parts = paths[0].split(".")
  hint = ""
  if suggestion:
    parts_fixed = [suggestion if p == missing else p for p in parts]
    hint = f" (did you mean --config.{'.'.join(parts_fixed)}?)"
  return f"--config.{paths[0]}: the config has no such setting{hint}"


def _config_argument(argv: Sequence[str]) -> str | None:
  """The value given to ``--config`` in ``argv`` (``--config=x`` or ``--config x``), if any."""
  for i, a in enumerate(argv):
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
  return None


def _config_file_error(e: BaseException) -> str | None:
  """The one-line message for a ``--config`` file that cannot be loaded (missing, or its
  ``get_config`` refused the ``:variant``); ml_collections quotes the whole traceback in ``e``, of
  which the last line names the problem. None for any other error."""
  text = str(e)
  if not (isinstance(e, flags.IllegalFlagValueError) and text.startswith("flag --config=")):
    return None
  flag = text.split(":", 1)[0].removeprefix("flag ")
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  return f"{flag}: {lines[-1]}"


def _raised_in(e: BaseException, package: str) -> bool:
  """Whether a frame of ``e``'s traceback runs code of the installed ``package``."""
  tb, part = e.__traceback__, f"{os.sep}{package}{os.sep}"
  while tb is not None:
    if part in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that a bad ``--config.`` override is a setting of the user's:
  one ``error:`` line and exit status 2, like the settings the run checks itself."""
  value = _config_argument(argv)
  if value and not os.path.isfile(value.split(":", 1)[0]):  # ml_collections would defer it
    print(f"error: --config={value}: no such file", file=sys.stderr, flush=True)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # sorted below; anything else is re-raised
    message = _override_error(e, argv) or _config_file_error(e)
    if message is not None:
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.exit(2)
    if not isinstance(e, flags.Error):
      raise
    # Any other bad flag: absl's own answer (app.parse_flags_with_usage), exit status 1.
    print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.",
          file=sys.stderr, flush=True)
    sys.exit(1)


def _sweep() -> int:
  """``--sweep`` or ``--sweep_status``: the config's members, each run by its own launch.py
  (local processes or a SLURM job array), or their state; returns the exit status."""
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    raise app.UsageError("--sweep starts its members as separate processes; it takes no "
                         "--coordinator/--num_processes")
  from medjax import sweep
  from medjax.io.errors import WorkdirLockedError
  from medjax.sweep import slurm
  from medjax.train import workdir_lock

  flag = flags.FLAGS["config"]
  config_arg = config_flags.get_config_filename(flag)
  base = config_flags.get_override_values(flag)
  settings = {"partition": _SLURM_PARTITION.value, "time": _SLURM_TIME.value,
              "cpus": _SLURM_CPUS.value, "gpus": _SLURM_GPUS.value, "mem": _SLURM_MEM.value,
              "options": _SLURM_OPTIONS.value}
  if _MEMBERS_PER_DEVICE.value != 1 and (_SWEEP_BACKEND.value == "slurm" or _SWEEP_STATUS.value):
    raise app.UsageError("--members_per_device is for local sweeps (--sweep with the local "
                         "backend); on SLURM each member is its own job")
  try:
    spec, _ = sweep.spec.split_slurm(sweep.load_spec(config_arg))
    if sweep.search.is_search(spec):
      # Several workers (commands, machines) share a search's workdir: each trial's folder is
      # locked by its member and its worker instead of the whole workdir.
      if _SWEEP_STATUS.value:
        return sweep.search.status(config_arg, base, _WORKDIR.value, spec["search"])
      if _SWEEP_BACKEND.value == "slurm":
        return sweep.search.submit(config_arg, base, _WORKDIR.value, spec["search"], settings,
                                   workers=_SWEEP_WORKERS.value,
                                   launch_script=os.path.abspath(__file__))
      return sweep.search.run(config_arg, base, _WORKDIR.value, spec["search"],
                              workers=_SWEEP_WORKERS.value,
                              launch_script=os.path.abspath(__file__),
                              members_per_device=_MEMBERS_PER_DEVICE.value)
    if _SWEEP_STATUS.value:
      return slurm.status(config_arg, base, _WORKDIR.value)
    with workdir_lock.hold(_WORKDIR.value):  # each member locks its own folder as well
      if _SWEEP_BACKEND.value == "slurm":
        return slurm.submit(config_arg, base, _WORKDIR.value, settings,
                            workers=_SWEEP_WORKERS.value, launch_script=os.path.abspath(__file__))
      return sweep.run(config_arg, base, _WORKDIR.value, workers=_SWEEP_WORKERS.value,
                       launch_script=os.path.abspath(__file__),
                       members_per_device=_MEMBERS_PER_DEVICE.value)
  except (sweep.SweepError, WorkdirLockedError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


def _sweep_flags_alone() -> None:
  """Refuses the sweep flags without --sweep, which alone reads them."""
  names = ["sweep_workers", "members_per_device", "sweep_backend", "slurm_partition",
           "slurm_time", "slurm_cpus", "slurm_gpus", "slurm_mem", "slurm_options"]
  given = [n for n in names if flags.FLAGS[n].present]
  if given:
    raise app.UsageError(f"--{given[0]} needs --sweep")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it renames at INFO.
  if _SWEEP.value or _SWEEP_STATUS.value:
    return _sweep()  # before JAX starts: the sweep's own process never holds a device
  _sweep_flags_alone()
  try:
    cluster = host.find_cluster()
  except host.ClusterError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  explicit = _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None
  host.start_distributed(cluster, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  print(host.start_line(cluster, explicit), flush=True)

  from medjax.train import preemption, workdir_lock

  try:
    with workdir_lock.hold_for_run(_WORKDIR.value):
      _train_and_validate()
  except preemption.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_STATUS)
  except Exception as e:
    if not _is_expected_error(e):
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def _train_and_validate() -> None:
  """Trains (and for segmentation validates) the run; process 0 prints the results."""
  import jax

  from medjax.train import loop

  on_eval = None
  if os.environ.get("MEDJAX_TRIAL"):  # a member of an Optuna search reports its evaluations
    from medjax.sweep import search

    on_eval = search.trial_hook(os.environ["MEDJAX_TRIAL"], _CONFIG.value.eval.best_metric,
                                _WORKDIR.value)
  try:
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, on_eval=on_eval)
  except loop.StoppedEarly as e:
    print(f"pruned: {e}", flush=True)
    return
  if jax.process_index() != 0:
    return
  best = " ".join(f"{k}={v:.4f}" for k, v in summary["best"].items())
  print(f"done: {summary['experiment']} best step {summary['best_step']}: "
        f"{summary['split']} {best}; train time {summary['train_seconds']:.0f} s; "
        f"results in {summary['workdir']}/results.md")
  if _CONFIG.value.task == "segmentation":
    # The fold's full validation: sliding window + mirroring on whole cases, in their geometry.
    from medjax.infer import segment

    result = segment.validate(summary["workdir"], mirror=_CONFIG.value.eval.mirror)
    dice = " ".join(f"{k}={v:.4f}" for k, v in result["per_class_dice"].items())
    print(f"validation (fold {result['fold']}, {result['cases']} cases, sliding window): "
          f"mean foreground Dice {result['foreground_dice']:.4f} ({dice}); "
          f"{result['seconds']:.0f} s")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/ imports work
  app.run(main, flags_parser=_parse_flags)
