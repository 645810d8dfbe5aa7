"""Per-case, per-class segmentation metrics (Dice, IoU, HD95, mean surface distance) in mm.

Host-side numpy/scipy, like ``selection.py``; `bootstrap_means` puts intervals on the per-class means
and `plot_dice_boxes` draws the per-case spread. Distances follow MONAI's ``monai.metrics`` (without
sub-voxel edges) so numbers compare with published MONAI/nnU-Net tables:

- **Surfaces.** A mask's surface is the set of its voxels that one binary erosion with *face*
  connectivity removes (scipy's default structure: 6 neighbours in 3-D, 4 in 2-D), with the
  outside of the image counted as background, so a mask touching the border has a surface there.
  This is ``monai.metrics.utils.get_mask_edges``. Distances run between surface voxel centres,
  in mm: ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.
- **HD95** is MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two
  *directed* 95th percentiles (pred→ref, ref→pred; linear interpolation as ``np.percentile``),
  not the 95th percentile of the pooled distances.
- **MSD** is MONAI's ``compute_average_surface_distance(symmetric=True)``: the mean of the
  pooled distances of both directions.
- **Empty masks.** Both empty (a true negative): every metric is NaN, nnU-Net's convention
  (``compute_metrics`` gives Dice NaN and averages with ``nanmean``), so `summarize` leaves the
  case out of that class' mean. One empty, the other not: Dice 0, IoU 0, and HD95 = MSD = the
  image diagonal in mm, ``norm(shape * spacing)``, a distance no pair of voxels in the field of
  view exceeds. A finite worst case (BraTS uses it: 373.13 mm for 240×240×155 at 1 mm) keeps means
  finite and penalises a missed or hallucinated structure instead of dropping it, as
  MetricsReloaded advises for distance metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from medjax.metrics import bootstrap

# A class is one label value, or a region: the union of several label values (BraTS-style).
Class = int | tuple[int, ...]


def class_labels(c: Class) -> list[int]:
  """The label values of a class: ``[c]`` for a label, the region's for a tuple."""
  return [int(v) for v in c] if isinstance(c, (tuple, list)) else [int(c)]


def class_key(c: Class) -> str:
  """A class as a JSON key: ``"2"`` for a label, ``"2,3"`` for a region."""
  return ",".join(map(str, class_labels(c)))

METRICS = ("dice", "iou", "hd95", "msd")
_HEADERS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (mm)", "msd": "MSD (mm)"}
_PERCENTILE = 95.0


def _masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f"pred {pred.shape} and ref {ref.shape} differ in shape")
  return pred, ref


def _spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
  spacing = np.asarray(spacing, np.float64).reshape(-1)
  if len(spacing) != ndim or np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"spacing must be {ndim} positive numbers (one per axis), got {spacing}")
  return spacing


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
  """Dice ``2|P∩R| / (|P| + |R|)`` of two boolean masks; NaN when both are empty."""
  pred, ref = _masks(pred, ref)
  denom = np.count_nonzero(pred) + np.count_nonzero(ref)
  return 2.0 * np.count_nonzero(pred & ref) / denom if denom else float("nan")


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
  """Intersection over union (Jaccard) of two boolean masks; NaN when both are empty."""
  pred, ref = _masks(pred, ref)
  union = np.count_nonzero(pred | ref)
  return np.count_nonzero(pred & ref) / union if union else float("nan")


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
  """The field of view's diagonal in mm, the distance given when exactly one mask is empty."""
  return float(np.linalg.norm(np.asarray(shape) * _spacing(spacing, len(shape))))


def _surface(mask: np.ndarray) -> np.ndarray:
  # scipy's default structure is face connectivity and border_value=0, as MONAI's get_mask_edges.
  return mask & ~ndimage.binary_erosion(mask)


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Distances in mm between the surfaces of two masks, in both directions.

  Args:
    pred: boolean mask, any number of spatial axes.
    ref: boolean mask of the same shape.
    spacing: voxel size in mm along each axis of the masks.

  Returns:
    ``(pred_to_ref, ref_to_pred)``: float64 ``[n_pred_surface]`` and ``[n_ref_surface]``, the
    distance from each surface voxel of one mask to the nearest surface voxel of the other
    (face-connectivity surfaces, see the module docstring). Where the other mask is empty the
    distances are ``inf`` (MONAI's convention); an empty mask has no distances.
  """
  pred, ref = _masks(pred, ref)
  spacing = _spacing(spacing, pred.ndim)
  union = pred | ref
  if not union.any():
    return np.zeros(0), np.zeros(0)
  # Crop to the union's bounding box plus one voxel: every surface and every nearest surface
  # voxel lies inside, and erosion sees the same neighbours, so the distances are unchanged.
  box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(union))
  pred_surf, ref_surf = _surface(pred[box]), _surface(ref[box])

  def directed(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    if not src.any():
      return np.zeros(0)
    if not dst.any():
      return np.full(np.count_nonzero(src), np.inf)
    return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]

  return directed(pred_surf, ref_surf), directed(ref_surf, pred_surf)


def _distances(pred: np.ndarray, ref: np.ndarray,
               spacing: Sequence[float]) -> tuple[float, float]:
  """(HD95, MSD) with the module's empty-mask conventions."""
  pred, ref = _masks(pred, ref)
  spacing = _spacing(spacing, pred.ndim)
  has_pred, has_ref = pred.any(), ref.any()
  if not (has_pred or has_ref):
    return float("nan"), float("nan")
  if not (has_pred and has_ref):
    worst = image_diagonal(pred.shape, spacing)
    return worst, worst
  d_pred, d_ref = surface_distances(pred, ref, spacing)
  hd95 = max(np.percentile(d_pred, _PERCENTILE), np.percentile(d_ref, _PERCENTILE))
  return float(hd95), float(np.concatenate([d_pred, d_ref]).mean())


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
  """95th-percentile symmetric Hausdorff distance in mm (MONAI: max of the directed HD95s).

  NaN when both masks are empty; the image diagonal (mm) when exactly one is.
  """
  return _distances(pred, ref, spacing)[0]


def mean_surface_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
  """Symmetric mean surface distance in mm (MONAI: mean over both directions' distances pooled).

  NaN when both masks are empty; the image diagonal (mm) when exactly one is.
  """
  return _distances(pred, ref, spacing)[1]


def segmentation_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray,
                         spacing: Sequence[float], classes: Sequence[Class],
                         ignore_label: int | None = None) -> dict[Class, dict[str, float]]:
  """All metrics of one case, class by class.

  Args:
    pred_labels: integer label map ``[*spatial]`` (a trailing channel of size 1, as in
      ``Volume.array``, is dropped).
    ref_labels: the reference label map, same shape.
    spacing: voxel size in mm per spatial axis (``Volume.spacing`` for a 3-D volume).
    classes: the labels to score, usually the foreground ones. An entry that is a tuple of labels
      is a region, scored as the union of its labels (nnU-Net's region-based evaluation).
    ignore_label: the reference's voxels of this label (not annotated) are left out of both
      masks, whatever was predicted there (nnU-Net's ``ignore_mask``).

  Returns:
    ``{class: {"dice", "iou", "hd95", "msd", "ref_voxels", "pred_voxels"}}``, distances in mm,
    voxel counts as ints; empty masks follow the module docstring.
  """
  pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
  if pred_labels.shape != ref_labels.shape:
    raise ValueError(f"pred {pred_labels.shape} and ref {ref_labels.shape} differ in shape")
  ndim = len(np.asarray(spacing).reshape(-1))
  if pred_labels.ndim == ndim + 1 and pred_labels.shape[-1] == 1:
    pred_labels, ref_labels = pred_labels[..., 0], ref_labels[..., 0]
  annotated = True if ignore_label is None else ref_labels != ignore_label
  results = {}
  for c in classes:
    key = tuple(c) if isinstance(c, (tuple, list)) else c
    labels = list(key) if isinstance(key, tuple) else [key]
    pred, ref = np.isin(pred_labels, labels) & annotated, np.isin(ref_labels, labels)
    hd, msd = _distances(pred, ref, spacing)
    results[key] = {"dice": dice(pred, ref), "iou": iou(pred, ref), "hd95": hd, "msd": msd,
                    "ref_voxels": int(np.count_nonzero(ref)),
                    "pred_voxels": int(np.count_nonzero(pred))}
  return results


@dataclasses.dataclass(frozen=True)
class SegmentationSummary:
  """Metrics over a set of cases, per class.

  Attributes:
    mean: ``{class: {metric: mean}}`` over the cases where the metric is not NaN.
    std: ``{class: {metric: std}}``, population std (ddof=0) over the same cases.
    count: ``{class: {metric: n}}``, how many cases entered the mean.
    foreground_mean: ``{metric: value}``, the mean of the per-class means over every class but
      label 0 (classes whose mean is NaN are skipped).
    num_cases: how many cases were summarised.
  """

  mean: dict[Class, dict[str, float]]
  std: dict[Class, dict[str, float]]
  count: dict[Class, dict[str, int]]
  foreground_mean: dict[str, float]
  num_cases: int

  @property
  def classes(self) -> tuple[Class, ...]:
    return tuple(self.mean)

  @property
  def foreground_dice(self) -> float:
    return self.foreground_mean["dice"]


def _nan_stats(values: np.ndarray) -> tuple[float, float, int]:
  kept = values[~np.isnan(values)]
  if not len(kept):
    return float("nan"), float("nan"), 0
  return float(kept.mean()), float(kept.std()), len(kept)


def summarize(cases: Sequence[Mapping[Class, Mapping[str, float]]]) -> SegmentationSummary:
  """Per-class mean ± std of every metric over cases, NaNs (both masks empty) left out.

  Args:
    cases: one `segmentation_metrics` result per case. A class missing from a case counts as
      NaN there.

  Returns:
    A `SegmentationSummary`; classes in order of first appearance.
  """
  classes = list(dict.fromkeys(c for case in cases for c in case))
  mean, std, count = {}, {}, {}
  for c in classes:
    mean[c], std[c], count[c] = {}, {}, {}
    for m in METRICS:
      values = np.array([case[c][m] if c in case else np.nan for case in cases], np.float64)
      mean[c][m], std[c][m], count[c][m] = _nan_stats(values)
  foreground = [c for c in classes if c not in (0, (0,))]
  foreground_mean = {
      m: _nan_stats(np.array([mean[c][m] for c in foreground], np.float64))[0] for m in METRICS}
  return SegmentationSummary(mean, std, count, foreground_mean, len(cases))


def bootstrap_means(cases: Sequence[Mapping[Class, Mapping[str, float]]], metric: str = "dice", *,
                    n_boot: int = bootstrap.N_BOOT, seed: int = 0,
                    confidence: float = bootstrap.CONFIDENCE) -> dict[str, Any]:
  """Bootstrap intervals of `summarize`'s per-class and foreground means of one metric.

  Cases are resampled with replacement (not stratified), and each resample is summarised as
  `summarize` does, so NaN cases are left out the same way.

  Args:
    cases: one `segmentation_metrics` result per case.
    metric: one of ``METRICS``.
    n_boot, seed, confidence: see `bootstrap.bootstrap`.

  Returns:
    ``{"per_class": {class: interval}, "foreground": interval}``, each interval
    ``{"value", "lo", "hi", "n_boot"}`` with ``value`` equal to `summarize`'s mean.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  cases = list(cases)

  def statistic(idx: np.ndarray) -> dict[tuple, float]:
    summary = summarize([cases[i] for i in idx])
    means = {("class", c): summary.mean[c][metric] for c in summary.classes}
    return {**means, ("foreground",): summary.foreground_mean[metric]}

  intervals = bootstrap.bootstrap(statistic, len(cases), n_boot=n_boot, seed=seed,
                                       confidence=confidence)
  return {"per_class": {key[1]: v for key, v in intervals.items() if key[0] == "class"},
          "foreground": intervals[("foreground",)]}


def _cell(mean: float, std: float, digits: int) -> str:
  if np.isnan(mean):
    return "n/a"
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if not np.isnan(std) else f"{mean:.{digits}f}"


def _class_labels(classes: Sequence[Class],
                  class_names: Mapping[Class, str] | Sequence[str] | None) -> dict[Class, str]:
  """A name per class: the given one, else its label (``"1+2"`` for a region)."""
  if class_names is not None and not isinstance(class_names, Mapping):
    if len(class_names) != len(classes):
      raise ValueError(f"{len(class_names)} class names for {len(classes)} classes")
    class_names = dict(zip(classes, class_names))
  class_names = class_names or {}
  return {c: str(class_names.get(c, "+".join(map(str, c)) if isinstance(c, tuple) else str(c)))
          for c in classes}


def format_table(summary: SegmentationSummary,
                 class_names: Mapping[Class, str] | Sequence[str] | None = None) -> str:
  """A Markdown table of per-class Dice, IoU, HD95 and MSD (mean ± std), plus the foreground mean.

  Args:
    summary: from `summarize`.
    class_names: a name per class, as a mapping from class or a sequence in ``summary.classes``
      order; classes without a name show their label (``"1+2"`` for a region).

  Returns:
    The table as a string, one row per class; ``n`` counts the cases that entered the means
    (cases where both masks are empty are not counted).
  """
  names = _class_labels(summary.classes, class_names)

  def name(c: Class) -> str:
    return names[c].replace("|", "\\|")

  digits = {"dice": 3, "iou": 3, "hd95": 2, "msd": 2}
  lines = ["| Class | n | " + " | ".join(_HEADERS[m] for m in METRICS) + " |",
           "|---|---:|" + "---:|" * len(METRICS)]
  for c in summary.classes:
    cells = [_cell(summary.mean[c][m], summary.std[c][m], digits[m]) for m in METRICS]
    lines.append(f"| {name(c)} | {summary.count[c]['dice']} | " + " | ".join(cells) + " |")
  fg = [_cell(summary.foreground_mean[m], np.nan, digits[m]) for m in METRICS]
  lines.append("| **Foreground mean** | | " + " | ".join(fg) + " |")
  return "\n".join(lines) + "\n"


def plot_dice_boxes(cases: Sequence[Mapping[Class, Mapping[str, float]]], path: str,
                    class_names: Mapping[Class, str] | Sequence[str] | None = None,
                    metric: str = "dice", title: str = "") -> None:
  """Box plot of a metric's per-case values, one box per class, cases that are NaN left out.

  Args:
    cases: one `segmentation_metrics` result per case.
    path: the PNG to write.
    class_names: as in `format_table`, in the order classes first appear in ``cases``.
    metric: one of ``METRICS``.
    title: the axes title.
  """
  classes = list(dict.fromkeys(c for case in cases for c in case))
  names = _class_labels(classes, class_names)
  values = [np.array([case[c][metric] for case in cases if c in case], np.float64)
            for c in classes]
  values = [v[~np.isnan(v)] for v in values]
  fig = Figure(figsize=(1.5 + 0.9 * max(len(classes), 2), 3.6))
  ax = fig.subplots()
  ax.boxplot(values, showmeans=True)
  ax.set_xticks(range(1, len(classes) + 1), [names[c] for c in classes])
  for i, v in enumerate(values, start=1):  # every case, so small validation sets show their spread
    ax.plot(np.full(len(v), i), v, "k.", alpha=0.4, ms=3)
  ax.set_ylabel(_HEADERS[metric])
  if metric in ("dice", "iou"):
    ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
