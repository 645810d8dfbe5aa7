"""The classification report: every headline figure with its bootstrap interval; table and CSV."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medjax.metrics.bootstrap import CONFIDENCE, N_BOOT, Interval, bootstrap, bootstrap_ci
from medjax.metrics.calibration import expected_calibration_error, reliability_diagram
from medjax.metrics.classification import (
    NUM_BINS,
    accuracy,
    balanced_accuracy,
    binary_rates,
    check_inputs,
    class_names_or_indices,
    confusion_matrix,
    f1,
    nll,
    one_vs_rest_rates,
    roc_auc,
    youden_threshold,
)


def headline_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5,
                     class_names: Sequence[str] | None = None,
                     num_bins: int = NUM_BINS) -> dict[str, float]:
  """Every figure `classification_report` gives an interval for, on one set of cases.

  Binary: ``auc, acc, balanced_acc, f1, sensitivity, specificity, ppv, npv`` at ``threshold``,
  then ``youden_threshold`` and the four rates at it (``sensitivity@youden``, ...), then ``ece``
  and ``nll``. Multi-class: ``auc`` (one-vs-rest macro), ``acc``, ``balanced_acc``, ``f1`` (macro)
  at the argmax, ``sensitivity[name]`` and ``specificity[name]`` per class, ``ece``, ``nll``.

  Args:
    labels: ``[N]`` integer classes.
    probs: ``[N, K]`` class probabilities.
    threshold: the binary decision threshold on ``probs[:, 1]``; unused when ``K > 2``.
    class_names: ``K`` names for the per-class keys; default ``"0", "1", ...``.
    num_bins: confidence bins of the ECE.

  Returns:
    ``{name: value}``, NaN where a value is undefined on these cases.
  """
  labels, probs = check_inputs(labels, probs)
  k = probs.shape[1]
  names = class_names_or_indices(class_names, k)
  threshold = threshold if k == 2 else None
  out = {"auc": roc_auc(labels, probs), "acc": accuracy(labels, probs, threshold),
         "balanced_acc": balanced_accuracy(labels, probs, threshold),
         "f1": f1(labels, probs, threshold)}
  if k == 2:
    out.update(binary_rates(labels, probs, threshold))
    youden = youden_threshold(labels, probs)
    out["youden_threshold"] = youden
    rates = (binary_rates(labels, probs, youden) if np.isfinite(youden)
             else dict.fromkeys(("sensitivity", "specificity", "ppv", "npv"), float("nan")))
    out.update({f"{name}@youden": value for name, value in rates.items()})
  else:
    rates = one_vs_rest_rates(labels, probs)
    for c, name in enumerate(names):
      out[f"sensitivity[{name}]"] = float(rates["sensitivity"][c])
      out[f"specificity[{name}]"] = float(rates["specificity"][c])
  out["ece"] = expected_calibration_error(labels, probs, num_bins)
  out["nll"] = nll(labels, probs)
  return out


def classification_report(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5,
                          n_boot: int = N_BOOT, seed: int = 0,
                          class_names: Sequence[str] | None = None, *,
                          num_bins: int = NUM_BINS,
                          confidence: float = CONFIDENCE) -> dict[str, Any]:
  """The full evaluation of single-label predictions, with bootstrap intervals.

  Youden's threshold is re-chosen on every resample, so the rates at it carry the uncertainty of
  choosing the threshold on the same cases, not only of measuring at a fixed one.

  Args:
    labels: ``[N]`` integer classes.
    probs: ``[N, K]`` class probabilities.
    threshold: binary tasks' decision threshold on ``probs[:, 1]``; unused when ``K > 2``.
    n_boot: stratified bootstrap resamples (0 for point estimates only).
    seed: the resampling seed.
    class_names: ``K`` names for the per-class rows; default ``"0", "1", ...``.
    num_bins: confidence bins of the ECE and the reliability diagram.
    confidence: the intervals' coverage.

  Returns:
    A JSON-ready dict: ``metrics`` ``{name: {"value", "lo", "hi", "n_boot"}}`` (names as in
    `headline_metrics`), ``confusion_matrix`` (``[K][K]`` at the threshold or argmax),
    ``reliability`` (`reliability_diagram` as lists), and the settings: ``num_cases``,
    ``class_names``, ``class_counts``, ``threshold`` (None when ``K > 2``), ``n_boot``, ``seed``,
    ``confidence``, ``num_bins``.
  """
  labels, probs = check_inputs(labels, probs)
  k = probs.shape[1]
  names = class_names_or_indices(class_names, k)
  threshold = threshold if k == 2 else None
  metrics = bootstrap_ci(
      lambda y, p: headline_metrics(y, p, threshold, names, num_bins), labels, probs,
      n_boot=n_boot, seed=seed, confidence=confidence)
  reliability = reliability_diagram(labels, probs, num_bins)
  return {
      "metrics": metrics,
      "confusion_matrix": confusion_matrix(labels, probs, threshold).tolist(),
      "reliability": {name: values.tolist() for name, values in reliability.items()},
      "num_cases": len(labels), "class_names": names,
      "class_counts": np.bincount(labels, minlength=k).tolist(), "threshold": threshold,
      "n_boot": n_boot, "seed": seed, "confidence": confidence, "num_bins": num_bins}


MULTILABEL_METRICS = ("auc", "acc", "sensitivity", "specificity", "f1")


def multilabel_report(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5,
                      n_boot: int = N_BOOT, seed: int = 0,
                      label_names: Sequence[str] | None = None, *,
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
  """Multi-label predictions (one sigmoid per label, e.g. ChestMNIST) scored label by label.

  Each label is a binary task (`headline_metrics` at ``threshold``); cases are resampled together
  (not stratified: a case carries all its labels), so ``macro_auc``'s interval is that of the
  mean over labels. Keys are ``"<metric>[<label>]"`` and ``"macro_auc"``, in the same
  ``metrics`` layout as `classification_report`, so `format_table` and `write_csv` take it.

  Args:
    labels: ``[N, L]`` 0/1.
    probs: ``[N, L]`` per-label probabilities.
  """
  labels = np.asarray(labels).astype(np.int64)
  probs = np.asarray(probs, np.float64)
  if labels.ndim != 2 or labels.shape != probs.shape:
    raise ValueError(f"multi-label labels {labels.shape} and probs {probs.shape} must both be "
                     "[N, L]")
  names = class_names_or_indices(label_names, labels.shape[1])

  def statistic(idx: np.ndarray) -> dict[str, float]:
    out, aucs = {}, []
    for j, name in enumerate(names):
      y, p = labels[idx, j], probs[idx, j]
      both = np.stack([1 - p, p], axis=1)
      values = headline_metrics(y, both, threshold, ["0", "1"]) if len(np.unique(y)) == 2 \
          else {"auc": float("nan"), "acc": accuracy(y, both, threshold)}
      for key in MULTILABEL_METRICS:
        out[f"{key}[{name}]"] = values.get(key, float("nan"))
      aucs.append(out[f"auc[{name}]"])
    finite = [a for a in aucs if np.isfinite(a)]
    return {"macro_auc": float(np.mean(finite)) if finite else float("nan"), **out}

  metrics = bootstrap(statistic, len(labels), n_boot=n_boot, seed=seed, confidence=confidence)
  return {"metrics": metrics, "num_cases": len(labels), "class_names": names,
          "label_counts": labels.sum(0).tolist(), "threshold": threshold, "n_boot": n_boot,
          "seed": seed, "confidence": confidence, "multi_label": True}


_DISPLAY = {"macro_auc": "Macro AUC", "auc": "AUC", "acc": "Accuracy", "balanced_acc": "Balanced accuracy", "f1": "F1",
            "sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV",
            "npv": "NPV", "youden_threshold": "Youden threshold", "ece": "ECE", "nll": "NLL"}


def _display_name(key: str) -> str:
  """A table row's label: ``sensitivity@youden`` -> Sensitivity at Youden threshold."""
  base, _, name = key.removesuffix("]").partition("[")
  base, _, at = base.partition("@")
  text = _DISPLAY.get(base, base) + (f" at {at.capitalize()} threshold" if at else "")
  text += f" ({name})" if name else ""
  return text.replace("|", "\\|")  # a "|" would end the Markdown cell


def format_table(report: Mapping[str, Any], digits: int = 3) -> str:
  """A Markdown table of `classification_report`'s metrics, cells like
  ``0.973 [0.962, 0.983]``; NaN shows as ``n/a``."""

  def cell(m: Interval) -> str:
    if not np.isfinite(m["value"]):
      return "n/a"
    if not (np.isfinite(m["lo"]) and np.isfinite(m["hi"])):
      return f"{m['value']:.{digits}f}"
    return f"{m['value']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"

  percent = f"{100 * report['confidence']:g}%"
  lines = [f"| Metric | Value [{percent} CI] |", "|---|---:|"]
  for key, m in report["metrics"].items():
    lines.append(f"| {_display_name(key)} | {cell(m)} |")
  return "\n".join(lines) + "\n"


def write_csv(report: Mapping[str, Any], path: str) -> None:
  """Writes `classification_report`'s metrics to ``path`` as ``metric,value,lo,hi,n_boot`` rows."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["metric", "value", "lo", "hi", "n_boot"])
    for key, m in report["metrics"].items():
      writer.writerow([key, m["value"], m["lo"], m["hi"], m["n_boot"]])
