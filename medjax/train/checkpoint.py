"""Orbax checkpoints holding the train state and the Grain iterator state of the same step.

Keeps the last ``keep`` checkpoints plus the best one by an evaluation metric. Orbax writes each
step into a temporary folder and renames it when complete, so a process killed mid-save leaves
the previous checkpoints restorable; leftover temporary folders are removed on the next start.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from medjax.train.state import TrainState

_SAVED_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng", "ema")


@contextlib.contextmanager
def _drop_absl_warning(text: str):
  """Drops absl log records containing ``text`` while the block runs (Orbax logs through absl)."""
  drop = lambda record: text not in record.getMessage()
  logger = std_logging.getLogger("absl")
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def _arrays(state: TrainState) -> dict[str, Any]:
  return {k: getattr(state, k) for k in _SAVED_FIELDS}


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator)`` pairs under ``directory``.

  Args:
    directory: the workdir's ``checkpoints/`` folder.
    keep: how many of the most recent checkpoints to keep.
    best_metric: name of the metric (higher is better) whose best checkpoint is also kept.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2, best_metric: str = "auc"):
    self.best_metric = best_metric
    metric_fn = lambda m: m[best_metric]
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=metric_fn, n=1, keep_checkpoints_without_metrics=False),
    ])
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=False, create=True,
            cleanup_tmp_directories=True,
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

  def save(self, step: int, state: TrainState, data_iter: Any | None,
           metrics: dict[str, float] | None = None) -> None:
    """Writes ``state`` (and the iterator position) as checkpoint ``step``; blocks until done."""
    items = {"state": ocp.args.StandardSave(_arrays(state))}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if metrics is not None and self.best_metric not in metrics:
      raise KeyError(f"metrics {sorted(metrics)} lack best_metric {self.best_metric!r}")
    # A save between evaluations has no metrics by design; Orbax would warn about each one.
    with _drop_absl_warning("did not provide metrics"):
      self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, state: TrainState, data_iter: Any | None = None) -> TrainState:
    """Restores checkpoint ``step`` into the structure and shardings of ``state``.

    ``data_iter`` (when given) is moved to the saved position in place.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return state.replace(**restored["state"])

  def restore_variables(self, step: int | None = None) -> dict[str, Any]:
    """The model variables to evaluate with (the EMA when the run kept one) of checkpoint
    ``step`` (default: the best), without rebuilding the optimiser: for inference."""
    step = step if step is not None else (self.best_step() or self.latest_step())
    if step is None:
      raise FileNotFoundError(f"{self._manager.directory}: no checkpoint")
    # Onto one local device, whatever mesh the run trained on: a run saved from 2 host devices
    # must load in a 1-device inference process (Orbax refuses a topology change by default).
    item = os.path.join(os.fspath(self._manager.directory), str(step), "state")
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
