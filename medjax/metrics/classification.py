"""Classification metrics on host arrays: ACC, AUC, NLL, F1, confusion and rates, thresholds.

Host-side numpy / scikit-learn on ``labels [N]`` (integer classes) and
``probs [N, K]`` (class probabilities); nothing here loads a model. These are the definitions of
ACC, AUC and NLL that the training loop selects checkpoints with (``selection.py`` calls them), so
the loop and the final report cannot disagree.

- **Predictions.** Binary tasks call a case positive when ``probs[:, 1] >= threshold``, the rule
  of ``sklearn.metrics.roc_curve``, so a threshold read off the ROC curve (Youden's) means the
  same thing here. Multi-class tasks, and ``threshold=None``, use the argmax; at 0.5 the two differ
  only on exact ties.
- **Undefined values are NaN**, not an exception: AUC without every class, PPV with no predicted
  positives, and so on. The bootstrap leaves NaN resamples out and says how many it kept.
- **Intervals** (`bootstrap.py`) are percentile bootstrap intervals over cases resampled with replacement, within
  each class (stratified), so every resample keeps the class counts of the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

NUM_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks".


def check_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``labels`` as int64 ``[N]`` and ``probs`` as float64 ``[N, K]``; raises on a mismatch."""
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[1] < 2 or len(probs) != len(labels):
    raise ValueError(f"probs {probs.shape} do not match labels {labels.shape}")
  if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
    raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got {labels.min()} to "
                     f"{labels.max()}")
  return labels, probs


def predict(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
  """Predicted classes ``[N]``: ``probs[:, 1] >= threshold`` for binary tasks given a threshold,
  the argmax otherwise."""
  probs = np.asarray(probs)
  if threshold is None or probs.shape[1] != 2:
    return np.argmax(probs, axis=1)
  return (probs[:, 1] >= threshold).astype(np.int64)


def _all_present(labels: np.ndarray, num_classes: int) -> bool:
  return len(np.unique(labels)) == num_classes


def accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> float:
  """Fraction of cases whose `predict` class is the label."""
  labels, probs = check_inputs(labels, probs)
  return float(np.mean(predict(probs, threshold) == labels))


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
  """The ROC AUC in its Mann–Whitney form, P(score of a positive > a negative's) with ties
  counting half: equal to scikit-learn's trapezoidal AUC, without its input validation, which
  took most of the time of a bootstrap (thousands of calls on a few hundred cases)."""
  ranks = stats.rankdata(scores)  # average ranks for ties
  n_pos = int(positive.sum())
  n_neg = positive.size - n_pos
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
  """Positive-class ROC AUC for ``K == 2``, macro one-vs-rest AUC otherwise (scikit-learn's).

  NaN unless every class occurs in ``labels`` (scikit-learn's value, without its warning).
  """
  labels, probs = check_inputs(labels, probs)
  k = probs.shape[1]
  if not _all_present(labels, k):
    return float("nan")
  if k == 2:
    return _binary_auc(labels == 1, probs[:, 1])
  # Renormalised because float32 softmax rows may miss scikit-learn's sum-to-one check.
  return float(skm.roc_auc_score(labels, probs / probs.sum(1, keepdims=True), multi_class="ovr",
                                 average="macro", labels=np.arange(k)))


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean negative log-likelihood of the labels, probabilities clipped at 1e-12."""
  labels, probs = check_inputs(labels, probs)
  return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray,
                      threshold: float | None = None) -> float:
  """Mean per-class recall over the classes present in ``labels`` (scikit-learn's)."""
  labels, probs = check_inputs(labels, probs)
  return float(skm.balanced_accuracy_score(labels, predict(probs, threshold)))


def f1(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> float:
  """F1 of the positive class for binary tasks, macro F1 over all classes otherwise.

  A class with no true and no predicted cases has no F1 and is left out of the macro mean; NaN
  when no class has one.
  """
  labels, probs = check_inputs(labels, probs)
  k = probs.shape[1]
  return float(skm.f1_score(labels, predict(probs, threshold), labels=np.arange(k),
                            average="binary" if k == 2 else "macro", zero_division=np.nan))


def confusion_matrix(labels: np.ndarray, probs: np.ndarray,
                     threshold: float | None = None) -> np.ndarray:
  """``[K, K]`` counts, rows the true class and columns the `predict` class."""
  labels, probs = check_inputs(labels, probs)
  return skm.confusion_matrix(labels, predict(probs, threshold), labels=np.arange(probs.shape[1]))


def _ratio(numerator: float, denominator: float) -> float:
  return float(numerator / denominator) if denominator else float("nan")


def binary_rates(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
  """Sensitivity, specificity, PPV and NPV of a binary task at ``threshold``.

  Returns:
    ``{"sensitivity", "specificity", "ppv", "npv"}``; each NaN when its denominator is 0.
  """
  labels, probs = check_inputs(labels, probs)
  if probs.shape[1] != 2:
    raise ValueError(f"binary_rates needs K == 2 classes, got {probs.shape[1]}")
  tn, fp, fn, tp = confusion_matrix(labels, probs, threshold).ravel()
  return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
          "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}


def one_vs_rest_rates(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
  """Per-class sensitivity and specificity of the argmax, each class against the rest.

  Returns:
    ``{"sensitivity": [K], "specificity": [K]}``; NaN where the denominator is 0.
  """
  cm = confusion_matrix(labels, probs).astype(np.float64)
  hits, actual, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
  true_negatives = cm.sum() - actual - predicted + hits
  return {"sensitivity": np.array([_ratio(h, a) for h, a in zip(hits, actual)]),
          "specificity": np.array([_ratio(t, cm.sum() - a)
                                   for t, a in zip(true_negatives, actual)])}


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
  """The threshold on ``probs[:, 1]`` that maximises Youden's J = sensitivity + specificity - 1.

  Among ties, the highest threshold (the fewest positive calls). NaN without both classes.
  """
  labels, probs = check_inputs(labels, probs)
  if probs.shape[1] != 2:
    raise ValueError(f"youden_threshold needs K == 2 classes, got {probs.shape[1]}")
  if not _all_present(labels, 2):
    return float("nan")
  # Every distinct score is a candidate: dropping collinear ROC points could change the tie-break.
  fpr, tpr, thresholds = skm.roc_curve(labels, probs[:, 1], drop_intermediate=False)
  # thresholds[0] is +inf, the "call nothing positive" corner, which is not a usable threshold.
  return float(thresholds[1 + np.argmax((tpr - fpr)[1:])])


def class_names_or_indices(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
  """``class_names`` as a list, or the class indices as strings; checks the count."""
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} classes")
  return names
