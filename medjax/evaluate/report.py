"""Evaluation figures: which slices a slice-sequence model attended to; the training report's
functions (`medjax.train.report`) are importable here too."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medjax.metrics.plots import plot_roc  # noqa: E402, F401
from medjax.train.report import plot_curves, write_report  # noqa: E402, F401


def plot_slice_attention(weights: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: str,
                         class_names: list[str] | tuple[str, ...], title: str = "") -> None:
  """Which slices drove a slice-sequence model's decisions: every case's attention over slices
  (rows sorted by true class, then by the predicted probability of the last class) beside the
  mean attention per slice for each true class."""
  weights, labels = np.asarray(weights), np.asarray(labels).reshape(-1)
  order = np.lexsort((probs[:, -1], labels))
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=(1.3, 1))
  im = left.imshow(weights[order], aspect="auto", cmap="magma", interpolation="nearest")
  bounds = np.cumsum(np.bincount(labels[order], minlength=len(class_names)))[:-1]
  for b in bounds:
    left.axhline(b - 0.5, color="w", lw=0.8)
  left.set_xlabel("slice")
  left.set_ylabel("case (by true class, then p(" + str(class_names[-1]) + "))")
  fig.colorbar(im, ax=left, label="attention")
  for k, name in enumerate(class_names):
    if np.any(labels == k):
      right.plot(weights[labels == k].mean(0), label=f"{name} (n={int(np.sum(labels == k))})")
  right.axhline(1 / weights.shape[1], color="k", ls="--", lw=0.8, label="uniform")
  right.set_xlabel("slice")
  right.set_ylabel("mean attention")
  right.legend(fontsize=8)
  right.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
