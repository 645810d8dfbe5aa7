"""nnU-Net's post-processing: keep only the largest connected component, where cross-validation
says it helps.

`determine_postprocessing` decides it on out-of-fold predictions the way nnU-Net v2 does
(``nnunetv2/postprocessing/remove_connected_components.py: determine_postprocessing``):

1. All foreground labels as one mask: keep its largest component when that raises the mean
   foreground Dice (the mean of the per-class means) *and* lowers no class's mean Dice.
2. Then, when there are several foreground classes, each class in turn, on the result of the
   steps kept so far: keep its largest component when that raises that class's mean Dice.

"Raises" is strict, as in nnU-Net v2: a tie keeps the prediction as it is. Removed voxels become
background. Components are found with full connectivity (26 neighbours in 3-D; nnU-Net's
``acvl_utils`` labels with scikit-image's default, ``connectivity=ndim``), and every component of
the largest size is kept when several tie. Cases where both masks are empty (Dice NaN) are left out
of the means, as in `medjax.metrics.segmentation.summarize`.

The decision is plain JSON (`write_decision` / `read_decision`): ``keep_largest`` lists the label
groups in the order `apply_postprocessing` applies them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medjax.io.atomic import atomic_write_json
from medjax.io.errors import MedjaxIOError
from medjax.metrics.segmentation import Class, class_key, class_labels, dice

FILENAME = "postprocessing.json"


def keep_largest_component(labels: np.ndarray, group: Sequence[int],
                           background: int = 0) -> np.ndarray:
  """``labels`` with every voxel of ``group`` outside the largest connected component of the
  group's union set to ``background`` (a copy; ``labels`` is unchanged).

  Args:
    labels: integer label map ``[*spatial]`` (or ``[*spatial, 1]``).
    group: the label values treated as one mask.
  """
  mask = np.isin(labels, list(group))
  squeeze = labels.ndim == 4 and labels.shape[-1] == 1
  spatial = mask[..., 0] if squeeze else mask
  components, n = ndimage.label(spatial, structure=np.ones((3,) * spatial.ndim, bool))
  if n <= 1:
    return labels.copy()
  sizes = np.bincount(components.ravel())[1:]
  keep = np.isin(components, np.flatnonzero(sizes == sizes.max()) + 1)
  if squeeze:
    keep = keep[..., None]
  out = labels.copy()
  out[mask & ~keep] = background
  return out


def apply_postprocessing(labels: np.ndarray, decision: dict[str, Any] | None) -> np.ndarray:
  """Applies a decision's ``keep_largest`` groups in order (None or an empty list: unchanged)."""
  for group in (decision or {}).get("keep_largest", []):
    labels = keep_largest_component(labels, group)
  return labels


def _mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], classes: Sequence[Class],
               ignore_label: int | None = None) -> dict[Class, float]:
  """Per-class mean Dice over cases, cases with both masks empty left out (NaN if all are);
  reference voxels labelled ``ignore_label`` are left out of both masks."""
  out = {}
  for c in classes:
    labels = class_labels(c)
    values = np.array([dice(np.isin(p, labels) & (r != ignore_label), np.isin(r, labels))
                       for p, r in zip(preds, refs)], np.float64)
    kept = values[~np.isnan(values)]
    out[c] = float(kept.mean()) if len(kept) else float("nan")
  return out


def _foreground(means: dict[Class, float]) -> float:
  values = [v for v in means.values() if not np.isnan(v)]
  return float(np.mean(values)) if values else float("nan")


def determine_postprocessing(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                             classes: Sequence[Class],
                             ignore_label: int | None = None) -> dict[str, Any]:
  """nnU-Net's keep-largest-component decision from out-of-fold predictions (module docstring).

  Args:
    preds: one predicted label map per case (any shape; each the shape of its reference).
    refs: the reference label maps, in the same order.
    classes: the foreground label values, or regions (tuples of label values): each region is
      then one group of the per-class steps, as nnU-Net post-processes region-based runs.
    ignore_label: reference voxels of this label (not annotated) count in no Dice.

  Returns:
    ``{"keep_largest": [[labels], ...], "steps": [{"labels", "applied", "dice_before",
    "dice_after"}], "dice_before": {class: mean}, "dice_after": {class: mean},
    "foreground_dice_before", "foreground_dice_after", "cases"}``; classes are string keys (JSON,
    `class_key`).
  """
  classes = [tuple(class_labels(c)) if isinstance(c, (tuple, list)) else int(c) for c in classes]
  if len(preds) != len(refs) or not preds:
    raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
  base = _mean_dice(preds, refs, classes, ignore_label)
  current, means, steps, keep = list(preds), dict(base), [], []

  foreground = sorted({v for c in classes for v in class_labels(c)})
  groups = [foreground] + ([class_labels(c) for c in classes] if len(classes) > 1 else [])
  for n, group in enumerate(groups):
    candidate = [keep_largest_component(p, group) for p in current]
    after = _mean_dice(candidate, refs, classes, ignore_label)
    if n == 0:  # all foreground as one: better on average and worse for no class
      before_value, after_value = _foreground(means), _foreground(after)
      applied = after_value > before_value and not any(after[c] < means[c] for c in classes)
    else:
      c = classes[n - 1]
      before_value, after_value = means[c], after[c]
      applied = after_value > before_value
    steps.append({"labels": group, "applied": bool(applied), "dice_before": before_value,
                  "dice_after": after_value})
    if applied:
      current, means = candidate, after
      keep.append(group)
  return {"keep_largest": keep, "steps": steps,
          "dice_before": {class_key(c): base[c] for c in classes},
          "dice_after": {class_key(c): means[c] for c in classes},
          "foreground_dice_before": _foreground(base), "foreground_dice_after": _foreground(means),
          "cases": len(preds)}


def write_decision(path: str, decision: dict[str, Any]) -> None:
  """Writes a decision as JSON (atomically)."""
  atomic_write_json(path, decision, indent=1, default=float)


def read_decision(path: str) -> dict[str, Any]:
  """A decision written by `write_decision`, checked.

  Raises:
    MedjaxIOError: missing, not JSON, or ``keep_largest`` is not a list of label lists.
  """
  try:
    with open(path) as f:
      decision = json.load(f)
  except FileNotFoundError:
    raise MedjaxIOError(path, "missing: python -m medjax.evaluate --cv (on a cross-validation "
                        "folder) or --choose (for a choice folder) writes it") from None
  except json.JSONDecodeError as e:
    raise MedjaxIOError(path, f"not valid JSON ({e})") from None
  groups = decision.get("keep_largest") if isinstance(decision, dict) else None
  if not isinstance(groups, list) or not all(
      isinstance(g, list) and g and all(isinstance(v, int) and v > 0 for v in g) for g in groups):
    raise MedjaxIOError(path, "'keep_largest' must be a list of lists of foreground labels")
  return decision


def find_decision(folder: str) -> str | None:
  """``folder/postprocessing.json`` when it exists."""
  path = os.path.join(folder, FILENAME)
  return path if os.path.isfile(path) else None
