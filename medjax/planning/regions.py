"""Region-based segmentation (nnU-Net v2's regions): overlapping groups of label values trained
as one sigmoid output each, and turned back into a label map at prediction.

BraTS is the example: whole tumour = {1, 2, 3} ⊃ tumour core = {2, 3} ⊃ enhancing = {3}. A
config declares them in order as ``data.regions = ("whole_tumour=1,2,3", "core=2,3",
"enhancing=3")``; the plan records them (``plan["regions"]``), so that every part that reads a
run (its network's outputs, its loss, its evaluation, prediction, ensembles) follows the plan.

A label map is rebuilt as nnU-Net does it (``regions_class_order``): start from background and,
region by region in the declared order, write the region's label wherever its probability
reaches 0.5, so later (inner) regions overwrite earlier (outer) ones. Each region's label is
the one of its values that no later region contains; declarations where that is not exactly
one value (regions that a label map cannot express) are refused.

Plans without regions are the ordinary case: one softmax channel per label value, argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLD = 0.5  # a region is predicted where its sigmoid probability reaches this


def parse_regions(spec: Sequence[str] | None, class_names: Sequence[str]
                  ) -> list[dict[str, Any]] | None:
  """``data.regions`` (``"name=l1,l2,..."`` strings, in order) → the plan's region entries
  ``{"name", "labels", "label"}``; None for no regions.

  Args:
    spec: the config's declarations.
    class_names: the dataset's label names by value (background first, no ignore label).

  Raises:
    ValueError: naming ``data.regions`` and the entry at fault: a malformed entry, a repeated
      name, a label the dataset does not have (or background), an empty or repeated region, or
      regions that no label map can express (see the module docstring).
  """
  if not spec:
    return None
  if isinstance(spec, str):
    spec = (spec,)
  valid = range(1, len(class_names))
  parsed: list[tuple[str, list[int]]] = []
  for entry in spec:
    name, sep, values = str(entry).partition("=")
    name = name.strip()
    try:
      labels = sorted({int(v) for v in values.split(",") if v.strip()})
    except ValueError:
      labels = []
    if not sep or not name or not labels:
      raise ValueError(f"data.regions entry {entry!r}: expected 'name=label,label,...' "
                       "(e.g. 'whole_tumour=1,2,3')")
    unknown = [v for v in labels if v not in valid]
    if unknown:
      raise ValueError(f"data.regions entry {entry!r}: label(s) {unknown} are not foreground "
                       f"labels of the dataset (1..{len(class_names) - 1}: "
                       f"{', '.join(class_names[1:])})")
    if name in {n for n, _ in parsed} or labels in [ls for _, ls in parsed]:
      raise ValueError(f"data.regions entry {entry!r}: its name or labels repeat an earlier one")
    parsed.append((name, labels))
  regions = []
  for n, (name, labels) in enumerate(parsed):
    later = {v for _, ls in parsed[n + 1:] for v in ls}
    own = [v for v in labels if v not in later]
    if len(own) != 1:
      raise ValueError(
          f"data.regions entry '{name}': {'no' if not own else 'several'} label values "
          f"({own}) belong to it and to no later region, so a label map cannot show it; declare "
          "the regions outermost first, each adding one label value (e.g. 'whole=1,2,3', "
          "'core=2,3', 'enhancing=3')")
    regions.append({"name": name, "labels": labels, "label": own[0]})
  return regions


def plan_regions(plan: dict[str, Any]) -> list[dict[str, Any]] | None:
  """The plan's regions (None: a plan without them, or one written before they existed)."""
  return plan.get("regions") or None


def output_channels(plan: dict[str, Any]) -> int:
  """The network's output channels: one per region, else one per label value."""
  regions = plan_regions(plan)
  return len(regions) if regions else plan["num_classes"]


def output_names(plan: dict[str, Any]) -> tuple[str, ...]:
  """The names of the network's outputs: the regions', else the label values'."""
  regions = plan_regions(plan)
  return tuple(r["name"] for r in regions) if regions else tuple(plan["class_names"])


def scored_classes(plan: dict[str, Any]) -> list[int | tuple[int, ...]]:
  """What evaluation scores, as `medjax.metrics.segmentation.segmentation_metrics` takes it:
  each region as the tuple of its labels, else each foreground label value."""
  regions = plan_regions(plan)
  if regions:
    return [tuple(r["labels"]) for r in regions]
  return list(range(1, plan["num_classes"]))


def scored_names(plan: dict[str, Any]) -> dict[int | tuple[int, ...], str]:
  """``{scored class: name}`` for `scored_classes`."""
  names = output_names(plan)
  classes = scored_classes(plan)
  offset = 0 if plan_regions(plan) else 1
  return {c: names[n + offset] for n, c in enumerate(classes)}


def region_targets(labels: jax.Array, regions: Sequence[Sequence[int]]) -> jax.Array:
  """Integer labels ``[...]`` → float32 ``[..., R]``, 1 where the voxel's label is in region
  ``r``."""
  return jnp.stack([jnp.isin(labels, jnp.asarray(r)) for r in regions], -1).astype(jnp.float32)


def labels_from_regions(probabilities, order: Sequence[int], threshold: float = THRESHOLD):
  """Region probabilities ``[..., R]`` → label map ``[...]`` (int32): nnU-Net's
  ``regions_class_order``, later regions overwriting earlier ones. numpy in, numpy out; a JAX
  array (also inside jit) gives a JAX array."""
  xp = jnp if isinstance(probabilities, jax.Array) else np
  out = xp.zeros(probabilities.shape[:-1], xp.int32)
  for r, label in enumerate(order):
    out = xp.where(probabilities[..., r] >= threshold, label, out)
  return out


def label_map(probabilities: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
  """Output probabilities ``[..., K]`` → label map ``[..., 1]`` (uint8) under ``plan``: the
  regions' label order, else the argmax."""
  regions = plan_regions(plan)
  if regions:
    labels = labels_from_regions(np.asarray(probabilities), [r["label"] for r in regions])
  else:
    labels = np.argmax(probabilities, -1)
  return labels[..., None].astype(np.uint8)


def sigmoid_(logits: np.ndarray) -> np.ndarray:
  """The logistic sigmoid of float32 logits, in place (a whole volume's outputs are the largest
  array of a prediction): region probabilities."""
  np.negative(logits, out=logits)
  np.exp(logits, out=logits)
  logits += 1.0
  return np.reciprocal(logits, out=logits)
