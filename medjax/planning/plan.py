"""nnU-Net-style planning: a dataset's fingerprint, and the plan made from it.

`fingerprint` summarises a dataset (spacings, shapes, foreground intensities, class sizes);
`make_plan` turns it into the decisions nnU-Net's planner makes: target spacing, patch size,
down-sampling strides per stage, feature widths, normalisation per channel. The plan is JSON in
the workdir (`load_or_make_plan`); any key can be overridden from the config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from medjax.io.atomic import atomic_write_json
from medjax.io.msd import MSDDataset, load_msd_case
from medjax.planning.preprocessing import nonzero_box
from medjax.planning.regions import parse_regions

# nnU-Net's constants: foreground intensity samples per case, the smallest feature map edge of the
# U-Net, the cap on feature widths, anisotropy threshold.
_INTENSITY_SAMPLES = 10_000
_MIN_FEATURE_EDGE = 4
_MAX_FEATURES = 320
_ANISOTROPY = 3.0


def fingerprint(dataset: MSDDataset) -> dict[str, Any]:
  """Spacings, shapes (after cropping to nonzero), foreground intensities and class sizes."""
  rng = np.random.default_rng(1234)
  spacings, shapes, samples, class_voxels = [], [], [], np.zeros(dataset.num_classes, np.int64)
  for case in dataset.cases:
    image, label = load_msd_case(dataset, case)
    box = nonzero_box(image.array)
    spacings.append(image.spacing.tolist())
    shapes.append([s.stop - s.start for s in box])
    if label is not None:
      seg = label.array[..., 0]
      class_voxels += np.bincount(seg.ravel(), minlength=dataset.num_classes)[:dataset.num_classes]
      voxels = image.array[seg > 0]
      if len(voxels):
        take = rng.choice(len(voxels), min(len(voxels), _INTENSITY_SAMPLES), replace=False)
        samples.append(voxels[take].astype(np.float64))
  stats = []
  pooled = np.concatenate(samples) if samples else np.zeros((1, len(dataset.channels)))
  for c in range(len(dataset.channels)):
    x = pooled[:, c]
    stats.append({"mean": float(x.mean()), "std": float(x.std()),
                  "p00_5": float(np.percentile(x, 0.5)), "p99_5": float(np.percentile(x, 99.5))})
  return {"dataset": dataset.name, "cases": len(dataset.cases), "spacings": spacings,
          "shapes": shapes, "median_spacing": np.median(spacings, 0).tolist(),
          "median_shape": np.median(shapes, 0).tolist(), "foreground_intensity": stats,
          "class_voxels": class_voxels.tolist(), "channels": list(dataset.channels),
          "class_names": list(dataset.labels)}


def make_plan(fp: dict[str, Any], dims: int = 3, max_patch_voxels: int = 40 * 56 * 40,
              base_features: int = 32, overrides: dict[str, Any] | None = None,
              regions: Sequence[str] | None = None) -> dict[str, Any]:
  """nnU-Net's planning rules, simplified to one configuration per ``dims`` (2 or 3).

  Target spacing is the median; on strongly anisotropic data (> 3×) the coarse axis takes the
  10th percentile instead, as nnU-Net does. The patch starts at the median shape at that spacing
  and shrinks (largest relative axis first) to ``max_patch_voxels`` (3-D) or its square root
  (2-D). Each axis is halved while its feature map stays ≥ 4 voxels (at most 5 times) and its
  voxels are at most twice as coarse as the finest axis's, and the patch is rounded up to a
  multiple of its total stride. 2-D plans slice along the coarsest axis (axis 0 on
  isotropic data) and keep the other two. A class named ``ignore`` (the highest label) becomes
  ``ignore_label``: not a class the network predicts. ``regions`` (``data.regions``) makes the
  network predict overlapping label groups, one sigmoid each (`medjax.planning.regions`).
  """
  if dims not in (2, 3):
    raise ValueError(f"plan dims must be 2 or 3, got {dims}")
  spacings = np.asarray(fp["spacings"], np.float64)
  target = np.median(spacings, 0)
  coarse = int(np.argmax(target))
  if target[coarse] > _ANISOTROPY * np.min(target):
    target[coarse] = np.percentile(spacings[:, coarse], 10)
  shape = np.asarray(fp["median_shape"], np.float64) * np.asarray(fp["median_spacing"]) / target
  slice_axis = None
  if dims == 2:
    slice_axis = coarse if target[coarse] > np.min(target) * 1.001 else 0
    shape = np.delete(shape, slice_axis)
    budget = max_patch_voxels / 4  # 2-D patches cost far less per voxel: keep whole slices
  else:
    budget = max_patch_voxels
  patch = np.maximum(np.round(shape), 1.0)
  while np.prod(patch) > budget:
    patch[np.argmax(patch / shape)] -= 1
  spacing = np.delete(target, slice_axis) if dims == 2 else target
  pools = np.zeros(len(patch), int)
  while True:
    can = (patch / 2 ** (pools + 1) >= _MIN_FEATURE_EDGE) & (pools < 5)
    current = spacing * 2.0**pools
    can &= current <= 2 * current.min()  # coarse axes wait until the fine ones catch up
    if not can.any():
      break
    pools[can] += 1
  stride_total = 2 ** pools
  patch = (np.ceil(patch / stride_total) * stride_total).astype(int)
  stages = int(pools.max()) + 1
  strides = [[1] * len(patch)] + [[2 if pools[a] >= s else 1 for a in range(len(patch))]
                                   for s in range(1, stages)]
  channels = fp["channels"]
  # nnU-Net's ignore label: a class named "ignore" marks voxels as not annotated; it must be the
  # highest label value, and the network does not predict it.
  names = list(fp["class_names"])
  ignore_label = names.index("ignore") if "ignore" in names else None
  if ignore_label is not None:
    if ignore_label != len(names) - 1:
      raise ValueError(f"the label named 'ignore' is {ignore_label}; it must be the highest label "
                       f"value ({len(names) - 1}), as nnU-Net requires")
    names = names[:-1]
  plan = {
      "dims": dims,
      "target_spacing": target.tolist(),
      "patch_size": patch.tolist(),
      "slice_axis": slice_axis,
      "strides": strides,
      "features": [min(base_features * 2**s, _MAX_FEATURES) for s in range(stages)],
      "channels": list(channels),  # input channel (modality) names, in input order
      "normalization": ["ct" if c.upper() == "CT" else "zscore" for c in channels],
      "foreground_intensity": fp["foreground_intensity"],
      "num_classes": len(names),
      "class_names": names,
      "ignore_label": ignore_label,  # voxels of this label are in no loss or metric (None: none)
      # nnU-Net's separate-z resampling where a case's or the target's spacing is more anisotropic
      # than this (medjax.planning.preprocessing.preprocess); None: never.
      "separate_z_anisotropy": _ANISOTROPY,
      # Region-based training (data.regions): [{"name", "labels", "label"}] in order; None: one
      # softmax channel per label value.
      "regions": parse_regions(regions, names),
  }
  for key, value in (overrides or {}).items():
    if key not in plan:
      raise KeyError(f"plan override {key!r} is not a plan key ({sorted(plan)})")
    plan[key] = value
  return plan


def load_or_make_plan(workdir: str, dataset: MSDDataset, *, dims: int, max_patch_voxels: int,
                      overrides: dict[str, Any] | None = None,
                      regions: Sequence[str] | None = None) -> dict[str, Any]:
  """``workdir/plan.json`` if it exists (a resumed run keeps its plan), else a new plan from the
  dataset's fingerprint with ``overrides``, written there by process 0."""
  path = os.path.join(workdir, "plan.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  plan = make_plan(fingerprint(dataset), dims=dims, max_patch_voxels=max_patch_voxels,
                   overrides=overrides, regions=regions)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    atomic_write_json(path, plan, indent=1)
  return plan
