"""The metrics the training loop selects checkpoints with (`medjax.train.tasks`), on host arrays.

Single-label ACC, AUC and NLL are `classification`'s definitions, the ones the evaluation report
puts confidence intervals on, so checkpoint selection and the final table cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from medjax.metrics import classification


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """ACC (argmax), AUC and mean NLL of single-label predictions.

  Args:
    labels: ``[N]`` integer class indices.
    probs: ``[N, K]`` class probabilities (rows sum to 1).

  Returns:
    ``{"acc", "auc", "nll"}``. AUC is the positive-class ROC AUC for ``K == 2`` and the
    macro one-vs-rest AUC otherwise; NaN unless every class is present in ``labels``.
  """
  labels, probs = classification.check_inputs(labels, probs)
  return {"acc": classification.accuracy(labels, probs),
          "auc": classification.roc_auc(labels, probs),
          "nll": classification.nll(labels, probs)}


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """Per-label ACC at 0.5 and macro AUC (as MedMNIST reports ChestMNIST), plus mean BCE.

  Args:
    labels: ``[N, K]`` binary targets.
    probs: ``[N, K]`` independent per-label probabilities.

  Returns:
    ``{"acc", "auc", "nll"}``; labels with a single class present are left out of the AUC.
  """
  labels = np.asarray(labels).astype(np.int64)
  probs = np.asarray(probs, np.float64)
  if probs.shape != labels.shape or probs.ndim != 2:
    raise ValueError(f"probs {probs.shape} do not match labels {labels.shape}")
  acc = float(np.mean((probs >= 0.5) == labels))
  p = np.clip(probs, 1e-12, 1 - 1e-12)
  nll = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
  aucs = [skm.roc_auc_score(labels[:, k], probs[:, k]) for k in range(labels.shape[1])
          if labels[:, k].min() != labels[:, k].max()]
  return {"acc": acc, "auc": float(np.mean(aucs)) if aucs else float("nan"), "nll": nll}


def pseudo_dice(labels: np.ndarray, predictions: np.ndarray, ignore_label: int | None = None,
                regions: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
  """nnU-Net's validation "pseudo Dice": per foreground class, one Dice over all voxels of all
  patches together (not a mean of per-case Dice), and ``dice``, their mean.

  Args:
    labels: ``[N, *spatial, 1]`` or ``[N, *spatial]`` integer label maps.
    predictions: ``[N, *spatial]`` predicted classes.
    ignore_label: voxels labelled so (not annotated) are left out, whatever was predicted there.
    regions: score these groups of label values instead (``dice_1`` is the first region's),
      for region-based runs (`medjax.planning.regions`).
  """
  labels = labels.reshape(predictions.shape)
  annotated = np.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
  if regions is None:
    top = max(labels[annotated].max(initial=0), predictions.max(initial=0))
    regions = [[k] for k in range(1, max(int(top) + 1, 2))]
  out = {}
  for k, group in enumerate(regions, start=1):
    y, p = np.isin(labels, group), np.isin(predictions, group) & annotated
    denominator = y.sum() + p.sum()
    out[f"dice_{k}"] = float(2 * np.sum(y & p) / denominator) if denominator else float("nan")
  values = [v for v in out.values() if np.isfinite(v)]
  return {"dice": float(np.mean(values)) if values else float("nan"), **out}
