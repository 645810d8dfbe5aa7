"""Classification plots: arrays in, a PNG out (ROC with a bootstrap band, PR, reliability,
confusion). Figures are built without pyplot, so no global backend or state."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from medjax.metrics.bootstrap import CONFIDENCE, resample_indices
from medjax.metrics.calibration import expected_calibration_error, reliability_diagram
from medjax.metrics.classification import NUM_BINS, class_names_or_indices, confusion_matrix

_ROC_GRID = np.linspace(0.0, 1.0, 201)  # FPRs at which bootstrap ROC curves are averaged.
_DPI = 110


def _save(fig: Figure, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)


def _one_vs_rest(labels: np.ndarray, probs: np.ndarray,
                 class_names: Sequence[str] | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """``(name, is_positive [N], score [N])`` per curve to draw: the positive class of a binary
  task, every class of a multi-class one, every label of ``[N, K]`` multi-label targets; curves
  whose cases are all positive or all negative are left out."""
  k = probs.shape[1]
  multi_label = labels.ndim == 2
  classes = [1] if (k == 2 and not multi_label) else range(k)
  curves = []
  for c in classes:
    positive = labels[:, c] if multi_label else labels == c
    if positive.min() == positive.max():
      continue
    name = class_names[c] if class_names is not None else f"class {c}"
    curves.append((name, positive.astype(np.int64), probs[:, c]))
  return curves


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: str, title: str = "", *,
             n_boot: int = 0, seed: int = 0, confidence: float = CONFIDENCE,
             class_names: Sequence[str] | None = None) -> None:
  """ROC curve(s) with an optional bootstrap band.

  Args:
    labels: ``[N]`` integer classes, or ``[N, K]`` binary multi-label targets.
    probs: ``[N, K]`` scores.
    path: the PNG to write.
    title: the axes title.
    n_boot: resamples for the band (0: none). Each resample's curve is read at fixed FPRs
      (vertical averaging, Fawcett 2006) and the band spans the pointwise percentiles; cases are
      resampled within each class for ``[N]`` labels.
    seed, confidence: the band's resampling seed and coverage.
    class_names: a name per class for the legend; default ``"class c"``.

  One curve for the positive class of a binary task, one-vs-rest per class otherwise, one per
  label for multi-label targets.
  """
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  curves = _one_vs_rest(labels, probs, class_names)
  bands = np.full((n_boot, len(curves), len(_ROC_GRID)), np.nan)
  strata = labels if labels.ndim == 1 else None
  for b, idx in enumerate(resample_indices(len(labels), n_boot, seed, strata)):
    for j, (_, positive, score) in enumerate(curves):
      if positive[idx].min() != positive[idx].max():
        fpr, tpr, _ = skm.roc_curve(positive[idx], score[idx])
        bands[b, j] = np.interp(_ROC_GRID, fpr, tpr)
        bands[b, j, 0] = 0.0  # the curve starts at the origin, whatever the first vertical step
  fig = Figure(figsize=(4.2, 4))
  ax = fig.subplots()
  tail = 50.0 * (1.0 - confidence)
  for j, (name, positive, score) in enumerate(curves):
    fpr, tpr, _ = skm.roc_curve(positive, score)
    line, = ax.plot(fpr, tpr, label=f"{name} (AUC {skm.auc(fpr, tpr):.3f})")
    kept = bands[:, j][np.isfinite(bands[:, j, -1])]
    if len(kept):
      lo, hi = np.percentile(kept, [tail, 100.0 - tail], axis=0)
      ax.fill_between(_ROC_GRID, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
  if n_boot and curves:
    ax.fill_between([], [], color="grey", alpha=0.2, lw=0,
                    label=f"{100 * confidence:g}% CI, {n_boot} resamples")
  ax.plot([0, 1], [0, 1], "k--", lw=0.8)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title)
  ax.legend(loc="lower right", fontsize=8)
  _save(fig, path)


def plot_pr(labels: np.ndarray, probs: np.ndarray, path: str, title: str = "", *,
            class_names: Sequence[str] | None = None) -> None:
  """Precision-recall curve(s), average precision in the legend; curves as `plot_roc` draws them,
  and for a binary task a dashed line at the prevalence (a random classifier's precision)."""
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  curves = _one_vs_rest(labels, probs, class_names)
  fig = Figure(figsize=(4.2, 4))
  ax = fig.subplots()
  for name, positive, score in curves:
    precision, recall, _ = skm.precision_recall_curve(positive, score)
    ap = skm.average_precision_score(positive, score)
    ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {ap:.3f})")
  if len(curves) == 1:
    ax.axhline(curves[0][1].mean(), color="k", ls="--", lw=0.8, label="prevalence")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("recall")
  ax.set_ylabel("precision")
  ax.set_title(title)
  ax.legend(loc="lower left", fontsize=8)
  _save(fig, path)


def plot_reliability(labels: np.ndarray, probs: np.ndarray, path: str, title: str = "", *,
                     num_bins: int = NUM_BINS) -> None:
  """Reliability diagram: accuracy per confidence bin against the diagonal, ECE in the legend,
  and beneath it how many cases fall in each bin."""
  bins = reliability_diagram(labels, probs, num_bins)
  ece = expected_calibration_error(labels, probs, num_bins)
  edges, width = bins["edges"][:-1], 1.0 / num_bins
  filled = bins["count"] > 0
  fig = Figure(figsize=(4.2, 5))
  top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
  top.bar(edges[filled], bins["accuracy"][filled], width, align="edge", edgecolor="k",
          label=f"accuracy (ECE {ece:.3f})")
  top.bar(edges[filled], bins["confidence"][filled] - bins["accuracy"][filled], width,
          bottom=bins["accuracy"][filled], align="edge", color="tab:red", alpha=0.3,
          label="gap to mean confidence")
  top.plot([0, 1], [0, 1], "k--", lw=0.8)
  top.set_xlim(0, 1)
  top.set_ylim(0, 1)
  top.set_ylabel("accuracy")
  top.set_title(title)
  top.legend(loc="upper left", fontsize=8)
  bottom.bar(edges, bins["count"], width, align="edge", color="grey", edgecolor="k")
  bottom.set_xlabel("confidence (top-class probability)")
  bottom.set_ylabel("cases")
  _save(fig, path)


def plot_confusion(labels: np.ndarray, probs: np.ndarray, path: str, title: str = "", *,
                   threshold: float | None = 0.5,
                   class_names: Sequence[str] | None = None) -> None:
  """Confusion-matrix heat-map: colour is the fraction of each true class (row), cells show the
  count and that fraction; predictions as `predict` makes them."""
  cm = confusion_matrix(labels, probs, threshold)
  k = len(cm)
  names = class_names_or_indices(class_names, k)
  rows = cm.sum(1, keepdims=True)
  fractions = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
  fig = Figure(figsize=(1.2 + 0.7 * max(k, 4), 0.8 + 0.7 * max(k, 4)))
  ax = fig.subplots()
  image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
  for i in range(k):
    for j in range(k):
      ax.text(j, i, f"{cm[i, j]}\n{fractions[i, j]:.0%}", ha="center", va="center", fontsize=8,
              color="white" if fractions[i, j] > 0.5 else "black")
  ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
  ax.set_yticks(range(k), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  _save(fig, path)
