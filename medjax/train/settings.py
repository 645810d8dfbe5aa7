"""Checks of a run's settings, before the run reads data (`check`) or writes anything (`check_data`).

A setting that cannot work (an unregistered name, a batch of 0, a negative learning rate, a
metric the task does not report) is refused here with a ValueError naming the key, the value and
what would be accepted; ``launch.py`` prints it as one ``error:`` line with exit status 2. Like
the loop, this module reads the ConfigDict; the names it accepts come from the registries.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from medjax import models, registry  # noqa: F401  (models: registers the zoo)
from medjax.train import builders, optim, tasks  # noqa: F401  (optim: registers the optimisers)

# Where each data.source reads its records, and the tasks it has labels for.
SOURCE_TASKS = {
    "medmnist": ("classification", "multilabel_classification"),
    "msd": ("segmentation",),
    "harvard": ("fusion",),
}

# Numeric settings and the intervals they must lie in ("inf": unbounded); floats must also be
# finite. Keys a config does not have are skipped.
_RANGES = (
    ("train.batch_size", "[1, inf)"),
    ("train.min_steps", "[0, inf)"),
    ("train.log_every_steps", "[0, inf)"),  # 0: only the last step
    ("train.checkpoint_every_steps", "[0, inf)"),  # 0: at each evaluation
    ("train.keep_checkpoints", "[1, inf)"),
    ("train.label_smoothing", "[0, 1)"),
    ("train.mixup", "[0, inf)"),  # Beta(α, α)'s α; 0: off
    ("train.modality_dropout", "[0, 1]"),  # per image: one modality zeroed with this probability
    ("train.ema_decay", "[0, 1)"),
    ("train.bn_recalibration_batches", "[0, inf)"),
    ("optim.lr", "(0, inf)"),
    ("optim.weight_decay", "[0, inf)"),
    ("optim.momentum", "[0, 1)"),
    ("optim.warmup_fraction", "[0, 1]"),
    ("optim.end_lr_factor", "[0, 1]"),
    ("optim.grad_clip_norm", "[0, inf)"),  # 0: no clipping
    ("eval.batch_size", "[1, inf)"),
    ("eval.every_steps", "[0, inf)"),  # 0: once per epoch
    ("data.num_threads", "[0, inf)"),
    ("data.prefetch", "[0, inf)"),
    ("data.device_prefetch", "[0, inf)"),
    ("data.workers", "[-1, inf)"),  # -1: chosen per backend
)

# Segmentation only (data.source = "msd").
_MSD_RANGES = (
    ("data.folds", "[2, inf)"),
    ("data.foreground", "[0, 1]"),
    ("data.max_patch_voxels", "[1, inf)"),
)


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses settings that are wrong whatever the data.

  Raises:
    ValueError: names the first bad key, its value and what it accepts.
  """
  _check_registered("task", config.task, "tasks.")
  _check_registered("model.name", config.model.name, "models.")
  _check_registered("optim.name", config.optim.name, "optim.")
  source = config.data.source
  if source not in SOURCE_TASKS:
    raise ValueError(f"data.source={source!r} is not a data source; known: "
                     f"{', '.join(SOURCE_TASKS)}")
  if config.task not in SOURCE_TASKS[source]:
    readers = [s for s, t in SOURCE_TASKS.items() if config.task in t]
    raise ValueError(f"task={config.task!r} cannot train on data.source={source!r} (its labels "
                     f"serve {', '.join(SOURCE_TASKS[source])}); {config.task} reads "
                     f"data.source={' | '.join(readers)}")
  for key, interval in _RANGES + (_MSD_RANGES if source == "msd" else ()):
    _check_range(key, _get(config, key), interval)
  precision = _get(config, "train.precision")
  if precision is not None and precision not in builders.PRECISIONS:
    raise ValueError(f"train.precision={precision!r} is not a precision; known: "
                     f"{', '.join(builders.PRECISIONS)}")
  if source == "msd" and not 0 <= config.data.fold < config.data.folds:
    raise ValueError(f"data.fold={config.data.fold} is not one of the {config.data.folds} folds "
                     f"(0 to {config.data.folds - 1})")
  if _get(config, "data.regions") and source != "msd":
    raise ValueError(f"data.regions applies to segmentation data (data.source='msd'), not "
                     f"data.source={source!r}")
  if config.train.mixup and config.task == "segmentation":
    # Dice is not linear in its target, so a blend of two Dice losses is not the blended label's.
    raise ValueError("train.mixup applies to classification tasks, not segmentation")
  if config.eval.flip_axes and config.task in ("segmentation", "fusion"):
    # Per-voxel predictions would need un-flipping; the final validation mirrors (eval.mirror).
    raise ValueError("eval.flip_axes applies to classification tasks; segmentation: eval.mirror")


def check_data(config: ml_collections.ConfigDict, task: tasks.Task, num_classes: int,
               train_records: int, eval_records: int, eval_name: str = "") -> None:
  """Refuses settings that do not fit the data: split sizes and the metric to select on.

  Args:
    config: the run's config, already through `check`.
    task: the task built for the data (multi-label data makes classification multi-label).
    num_classes: classes of the data's label space (segmentation: with the background).
    train_records, eval_records: records of the training split and of ``eval.split``.
    eval_name: what the evaluated split is called in messages (e.g. ``pneumoniamnist_28:val``).

  Raises:
    ValueError: names the key and the problem.
  """
  eval_name = eval_name or config.eval.split
  if not eval_records:
    raise ValueError(f"eval.split={config.eval.split!r}: the split {eval_name} holds no "
                     "records, so nothing could be evaluated or selected on it")
  batch = config.train.batch_size
  if train_records < batch:
    raise ValueError(f"train.batch_size={batch} is more than the {train_records} records of the "
                     "training split, so an epoch would hold no step; use at most "
                     f"{train_records}")
  recalibration = config.train.get("bn_recalibration_batches") or 0
  if recalibration and train_records < config.eval.batch_size:
    raise ValueError(f"train.bn_recalibration_batches: the {train_records} training records do "
                     f"not fill one eval batch of {config.eval.batch_size} (eval.batch_size)")
  names = task.metric_names(num_classes)
  selectable = [n for n in names if n not in tasks.LOWER_IS_BETTER]
  metric = config.eval.best_metric
  if metric not in selectable:
    why = ("lower is better, and the best checkpoint is the one where it is highest"
           if metric in names else f"the {task.name} task reports {', '.join(names)}")
    raise ValueError(f"eval.best_metric={metric!r}: {why}; select on one of "
                     f"{', '.join(selectable)}")


def _check_registered(key: str, spec: str, prefix: str) -> None:
  """``spec`` (``name`` or ``name(args)``) names a registered ``prefix`` entry."""
  try:
    registry.lookup(spec, prefix)
  except (KeyError, ValueError):
    known = ", ".join(n.removeprefix(prefix) for n in registry.names(prefix))
    raise ValueError(f"{key}={spec!r} is unknown; known: {known}") from None


def _check_range(key: str, value: Any, interval: str) -> None:
  """``value`` lies in ``interval`` (``"[0, 1)"``, ``"(0, inf)"``); None (unset) passes."""
  if value is None or isinstance(value, bool):
    return
  low, high = (float(x) for x in interval[1:-1].split(","))
  closed_low, closed_high = interval[0] == "[", interval[-1] == "]"
  ok = (math.isfinite(value) and (value >= low if closed_low else value > low) and
        (value <= high if closed_high else value < high))
  if not ok:
    lo = interval[1:-1].split(",")[0].strip()
    wanted = (f"{'>=' if closed_low else '>'} {lo}" if math.isinf(high)
              else f"in {interval}")
    if not math.isfinite(value):
      wanted = f"a finite number {wanted}"
    raise ValueError(f"{key} must be {wanted}, got {value!r}")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      return None
    node = node[part]
  return node
