"""Orbax checkpoints holding the train state and the Grain iterator state of the same step.

Keeps the last ``keep`` checkpoints plus the best one by an evaluation metric. Orbax writes each
step into a temporary folder and renames it when complete, so a process killed mid-save leaves
the previous checkpoints restorable; leftover temporary folders are removed on the next start.

Each saved step also gets a sha256 record of its files (`medjax.io.integrity`), checked before
it is restored: Orbax notices a truncated file or a missing manifest, but decodes flipped bytes
inside an array chunk into wrong weights without an error. `Checkpointer.restore_latest` takes
the newest checkpoint that restores intact and moves the broken newer ones aside to
``checkpoints/corrupt-<step>`` (never deletes them).
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from medjax.io import integrity
from medjax.io.errors import (
    CheckpointCorruptError,
    DiskFullError,
    MedjaxIOError,
    describe_filesystem,
    is_disk_full,
    mentions_disk_full,
)
from medjax.train.state import TrainState

_SAVED_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng", "ema")


@contextlib.contextmanager
def _drop_absl_records(drop: Callable[[str], bool]):
  """Drops the absl log records whose message ``drop`` accepts while the block runs (Orbax logs
  through absl)."""
  keep = lambda record: not drop(record.getMessage())
  logger = std_logging.getLogger("absl")
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def _drop_absl_warning(text: str):
  """Drops absl log records containing ``text`` while the block runs."""
  return _drop_absl_records(lambda message: text in message)


def _drop_disk_full_logs():
  """Drops the tracebacks Orbax's writer threads log when the disk is full: `DiskFullError`
  says it in one line."""
  return _drop_absl_records(mentions_disk_full)


def _arrays(state: TrainState) -> dict[str, Any]:
  return {k: getattr(state, k) for k in _SAVED_FIELDS}


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator)`` pairs under ``directory``.

  Args:
    directory: the workdir's ``checkpoints/`` folder.
    keep: how many of the most recent checkpoints to keep.
    best_metric: name of the metric (higher is better) whose best checkpoint is also kept.
    read_only: only restore: nothing under ``directory`` is created, cleaned up or deleted (for
      reading another run's checkpoints, e.g. to fine-tune from them).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2, best_metric: str = "auc",
               read_only: bool = False):
    self.best_metric = best_metric
    self.directory = os.path.abspath(os.fspath(directory))
    metric_fn = lambda m: m[best_metric]
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=metric_fn, n=1, keep_checkpoints_without_metrics=False),
    ])
    # Orbax warns that a read-only manager saves nothing: what read_only asks for.
    with _drop_absl_records(lambda m: "read_only=True" in m or "directory is read only" in m):
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              preservation_policy=policy, enable_async_checkpointing=False,
              create=not read_only, cleanup_tmp_directories=not read_only, read_only=read_only,
              # Without best_fn Orbax neither writes the metrics to disk nor ranks by them:
              # best_step() is then the latest step, and after a restart BestN sees no metrics
              # and deletes the best checkpoint at the next save.
              best_fn=metric_fn, best_mode="max"),
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: TrainState, data_iter: Any | None,
           metrics: dict[str, float] | None = None) -> None:
    """Writes ``state`` (and the iterator position) as checkpoint ``step``, then its sha256
    record; blocks until done.

    Raises:
      DiskFullError: the device ran out of space; the previous checkpoints are untouched, and
        Orbax removes the partial step at the next start.
    """
    items = {"state": ocp.args.StandardSave(_arrays(state))}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if metrics is not None and self.best_metric not in metrics:
      raise KeyError(f"metrics {sorted(metrics)} lack best_metric {self.best_metric!r}")
    try:
      # A save between evaluations has no metrics by design; Orbax would warn about each one.
      with _drop_absl_warning("did not provide metrics"), _drop_disk_full_logs():
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
      self._manager.wait_until_finished()
      # Orbax renames the step into place only once every process has written its part.
      if jax.process_index() == 0:
        integrity.write_record(self.step_dir(step))
    except Exception as e:
      if is_disk_full(e):
        raise DiskFullError(self.directory, (
            f"no space left to save checkpoint {step} on {describe_filesystem(self.directory)}; "
            "the earlier checkpoints are intact: free space, then run the same command to "
            "resume")) from None
      raise
    if jax.process_count() > 1:  # the record exists before any process may read the step
      multihost_utils.sync_global_devices(f"checkpoint {step} recorded")

  def restore(self, step: int, state: TrainState, data_iter: Any | None = None) -> TrainState:
    """Restores checkpoint ``step`` into the structure and shardings of ``state``.

    ``data_iter`` (when given) is moved to the saved position in place.

    Raises:
      CheckpointCorruptError: the step's files differ from its sha256 record.
    """
    self._check(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return state.replace(**restored["state"])

  def restore_latest(self, state: TrainState,
                     data_iter: Any | None = None) -> tuple[TrainState, int]:
    """Restores the newest checkpoint that is intact; returns ``(state, step)``, step 0 (and
    ``state`` unchanged) when there is none.

    A checkpoint is broken when its files differ from their sha256 record, or, saved without
    one, when Orbax fails to read it. Broken checkpoints newer than the one restored are moved to
    ``checkpoints/corrupt-<step>`` with one logged line each: the run goes on from the older step
    and will save those step numbers again. A checkpoint that matches its record but still fails
    to load is not corrupt (the code or the config changed): that error is raised as it is.

    Raises:
      CheckpointCorruptError: every checkpoint is broken; each is named with its problem, and
        none is moved.
    """
    broken: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      recorded = integrity.has_record(self.step_dir(step))
      try:
        restored = self.restore(step, state, data_iter)
      except CheckpointCorruptError as e:
        broken.append((step, e.cause))
        continue
      except Exception as e:  # Orbax's errors have no common type: any failure of an unrecorded step
        if recorded:
          raise
        broken.append((step, f"Orbax could not read it ({type(e).__name__}: "
                             f"{_first_line(e)})"))
        continue
      for bad, why in broken:
        self._set_aside(bad, why)
      return restored, step
    if broken:
      raise CheckpointCorruptError(self.directory, "no intact checkpoint (" + "; ".join(
          f"step {s}: {why}" for s, why in broken) + "); nothing was moved: restore them from a "
          "copy, or move checkpoints/ away to train from scratch")
    return state, 0

  def check_best(self) -> None:
    """Moves the best checkpoint aside (one logged line) when it differs from its record, so that
    the run neither reports nor exports broken weights; the best of the others takes its place."""
    best = self.best_step()
    if best is None:
      return
    problem = integrity.check_record(self.step_dir(best))
    if problem:
      self._set_aside(best, problem)

  def _check(self, step: int) -> None:
    problem = integrity.check_record(self.step_dir(step))
    if problem:
      raise CheckpointCorruptError(self.step_dir(step), problem)

  def _set_aside(self, step: int, why: str) -> None:
    """Renames checkpoint ``step`` to ``corrupt-<step>`` (``corrupt-<step>.<n>`` if taken) and
    logs one line saying why; Orbax then no longer lists it."""
    if jax.process_index() == 0:
      target = os.path.join(self.directory, f"corrupt-{step}")
      n = 1
      while os.path.exists(target):
        target = os.path.join(self.directory, f"corrupt-{step}.{n}")
        n += 1
      os.rename(self.step_dir(step), target)
      logging.warning("checkpoint step %d skipped: %s; moved to %s", step, why, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self._manager.reload()

  def restore_variables(self, step: int | None = None) -> dict[str, Any]:
    """The model variables to evaluate with (the EMA when the run kept one) of checkpoint
    ``step`` (default: the best), without rebuilding the optimiser: for inference."""
    step = step if step is not None else (self.best_step() or self.latest_step())
    if step is None:
      raise FileNotFoundError(f"{self._manager.directory}: no checkpoint")
    # Onto one local device, whatever mesh the run trained on: a run saved from 2 host devices
    # must load in a 1-device inference process (Orbax refuses a topology change by default).
    self._check(step)
    item = os.path.join(self.step_dir(step), "state")
    with _drop_absl_warning("Metadata file does not exist"):  # asked of the item, not the step
      metadata = ocp.StandardCheckpointer().metadata(item)
    tree = getattr(metadata, "item_metadata", metadata)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
        getattr(tree, "tree", tree))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    if restored.get("ema"):
      return dict(restored["ema"])
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}

  def close(self) -> None:
    self._manager.close()


def load_variables(directory: str, best_metric: str, step: int | None = None,
                   what: str = "") -> tuple[dict[str, Any], int]:
  """``(variables, step)``: `Checkpointer.restore_variables` of checkpoint ``step`` (default:
  the best, else the latest) of a run's ``directory``, read without writing there.

  Raises:
    MedjaxIOError: the folder holds no checkpoint (``what`` prefixes the cause, e.g.
      ``"init_from: "``).
  """
  if not os.path.isdir(directory):
    raise MedjaxIOError(directory, f"{what}no checkpoints: the run has not saved one yet")
  ckpt = Checkpointer(directory, best_metric=best_metric, read_only=True)
  try:
    step = step or ckpt.best_step() or ckpt.latest_step()
    if step is None:
      raise MedjaxIOError(directory, f"{what}no checkpoint to load")
    return ckpt.restore_variables(step), step
  finally:
    ckpt.close()


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = (str(e).strip().splitlines() or [""])[0]
  return text if len(text) <= limit else text[:limit] + "..."
