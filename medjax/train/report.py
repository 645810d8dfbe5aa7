"""A training run's human-readable outputs: ``results.md`` and ``plots/`` (curves, ROC)."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medjax.metrics.plots import plot_roc  # noqa: E402


def plot_curves(history: list[dict[str, Any]], path: str) -> None:
  """Training loss and every logged eval metric against the step, one panel each."""
  keys = sorted({k for r in history for k in r if "/" in k and not k.startswith(("time/",
                                                                               "train/lr",
                                                                               "train/epoch"))})
  fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2),
                           squeeze=False)
  for ax, k in zip(axes[0], keys):
    pts = [(r["step"], r[k]) for r in history if k in r]
    ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(workdir: str, summary: dict[str, Any], history: list[dict[str, Any]],
                 labels: np.ndarray | None = None, probs: np.ndarray | None = None) -> None:
  """Writes ``plots/curves.png``, ``plots/roc_<split>.png`` (given class probabilities) and
  ``results.md``."""
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots, exist_ok=True)
  split = summary["split"]
  plot_curves(history, os.path.join(plots, "curves.png"))
  figures = "![curves](plots/curves.png)"
  if probs is not None:
    plot_roc(labels, probs, os.path.join(plots, f"roc_{split}.png"),
             f"{summary['experiment']} ({split}, step {summary['best_step']})")
    figures += f" ![roc](plots/roc_{split}.png)"
  best = summary["best"]
  lines = [
      f"# {summary['experiment']}", "",
      f"Best checkpoint (chosen on `{split}`): step {summary['best_step']} of "
      f"{summary['steps']}; training wall time this session {summary['train_seconds']:.0f} s.",
      "", "| split | " + " | ".join(best) + " |", "|---|" + "---|" * len(best),
      f"| {split} | " + " | ".join(f"{v:.4f}" for v in best.values()) + " |", "",
      figures, ""]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines))
