"""Classification results with bootstrap confidence intervals, calibration, tables and plots.

Host-side numpy / scikit-learn / matplotlib on ``labels [N]`` (integer classes) and
``probs [N, K]`` (class probabilities); nothing here loads a model. These are the definitions of
ACC, AUC and NLL that the training loop selects checkpoints with (``metrics.py`` calls them), so
the loop and the final report cannot disagree.

- **Predictions.** Binary tasks call a case positive when ``probs[:, 1] >= threshold``, the rule
  of ``sklearn.metrics.roc_curve``, so a threshold read off the ROC curve (Youden's) means the
  same thing here. Multi-class tasks, and ``threshold=None``, use the argmax; at 0.5 the two differ
  only on exact ties.
- **Undefined values are NaN**, not an exception: AUC without every class, PPV with no predicted
  positives, and so on. The bootstrap leaves NaN resamples out and says how many it kept.
- **Intervals** are percentile bootstrap intervals over cases resampled with replacement, within
  each class (stratified), so every resample keeps the class counts of the data.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import optimize, special
from sklearn import metrics as skm

N_BOOT = 1000
CONFIDENCE = 0.95
NUM_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks".
TEMPERATURE_BOUNDS = (0.05, 20.0)
_ROC_GRID = np.linspace(0.0, 1.0, 201)  # FPRs at which bootstrap ROC curves are averaged.
_DPI = 110
_SCALAR = "__value__"  # bootstrap_ci's key for a metric_fn that returns a single float.

# {"value", "lo", "hi", "n_boot"}: the point estimate, the interval, and the resamples it rests on.
Interval = dict[str, float | int]


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


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
  """Positive-class ROC AUC for ``K == 2``, macro one-vs-rest AUC otherwise (scikit-learn's).

  NaN unless every class occurs in ``labels`` (scikit-learn's value, without its warning).
  """
  labels, probs = check_inputs(labels, probs)
  k = probs.shape[1]
  if not _all_present(labels, k):
    return float("nan")
  if k == 2:
    return float(skm.roc_auc_score(labels, probs[:, 1]))
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


# --- Calibration


def reliability_diagram(labels: np.ndarray, probs: np.ndarray,
                        num_bins: int = NUM_BINS) -> dict[str, np.ndarray]:
  """Top-class confidence against accuracy in equal-width confidence bins.

  Bin ``m`` holds the cases whose confidence (the largest probability) lies in
  ``(edges[m], edges[m + 1]]``, as in Guo et al.'s reference code.

  Returns:
    ``{"edges": [num_bins + 1], "confidence": [num_bins], "accuracy": [num_bins],
    "count": [num_bins]}``: mean confidence and argmax accuracy per bin (NaN for an empty bin)
    and the number of cases in it.
  """
  labels, probs = check_inputs(labels, probs)
  confidence = probs.max(1)
  correct = (np.argmax(probs, 1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.searchsorted(edges[1:-1], confidence, side="left")
  count = np.bincount(bins, minlength=num_bins)

  def mean(weights: np.ndarray) -> np.ndarray:
    sums = np.bincount(bins, weights=weights, minlength=num_bins)
    return np.divide(sums, count, out=np.full(num_bins, np.nan), where=count > 0)

  return {"edges": edges, "confidence": mean(confidence), "accuracy": mean(correct),
          "count": count}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               num_bins: int = NUM_BINS) -> float:
  """ECE (Guo et al. 2017): ``sum_m |B_m| / N * |accuracy(B_m) - confidence(B_m)|`` over the
  equal-width top-class confidence bins of `reliability_diagram`."""
  bins = reliability_diagram(labels, probs, num_bins)
  filled = bins["count"] > 0
  gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
  return float(np.sum(bins["count"][filled] * gaps) / np.sum(bins["count"]))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
  """``softmax(logits / temperature)`` ``[N, K]``; log-probabilities work as logits."""
  return special.softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def fit_temperature(labels: np.ndarray, logits: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
  """The temperature that minimises the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

  Fit it on a validation split and pass the test split through `apply_temperature`; it changes
  confidences (ECE, NLL) but never the argmax.

  Args:
    labels: ``[N]`` integer classes.
    logits: ``[N, K]`` logits, or log-probabilities (a per-row shift does not change softmax).
    bounds: the search interval for T.

  Returns:
    T, found by a bounded 1-D search over log T.
  """
  labels, logits = check_inputs(labels, logits)
  result = optimize.minimize_scalar(
      lambda log_t: nll(labels, apply_temperature(logits, np.exp(log_t))),
      bounds=np.log(bounds), method="bounded", options={"xatol": 1e-6})
  return float(np.exp(result.x))


# --- Bootstrap


def resample_indices(num_cases: int, n_boot: int, seed: int = 0,
                     strata: np.ndarray | None = None) -> Iterator[np.ndarray]:
  """Bootstrap resamples of case indices, one ``[num_cases]`` int array at a time.

  Args:
    num_cases: cases to draw from.
    n_boot: resamples to yield.
    seed: seeds ``np.random.default_rng``; the same seed yields the same resamples.
    strata: optional ``[num_cases]`` group of each case (the class); each group is resampled on
      its own, so every resample keeps the group sizes. None resamples all cases together.
  """
  rng = np.random.default_rng(seed)
  if strata is None:
    groups = [np.arange(num_cases)]
  else:
    strata = np.asarray(strata)
    if strata.shape != (num_cases,):
      raise ValueError(f"strata {strata.shape} must be one group per case ({num_cases},)")
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
  for _ in range(n_boot):
    yield np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])


def _interval(point: float, draws: np.ndarray, confidence: float) -> Interval:
  kept = draws[np.isfinite(draws)]
  lo = hi = float("nan")
  if len(kept):
    tail = 50.0 * (1.0 - confidence)
    lo, hi = (float(v) for v in np.percentile(kept, [tail, 100.0 - tail]))
  return {"value": float(point), "lo": lo, "hi": hi, "n_boot": len(kept)}


def bootstrap(statistic: Callable[[np.ndarray], Mapping[Hashable, float]], num_cases: int, *,
              n_boot: int = N_BOOT, seed: int = 0, strata: np.ndarray | None = None,
              confidence: float = CONFIDENCE) -> dict[Hashable, Interval]:
  """Percentile bootstrap intervals of statistics computed over cases.

  Args:
    statistic: ``case_indices [n] -> {name: value}`` over the cases at those indices (repeats
      count again); NaN where a value is undefined on a resample.
    num_cases: the number of cases; ``statistic(arange(num_cases))`` is the point estimate.
    n_boot: resamples.
    seed: see `resample_indices`.
    strata: see `resample_indices`; pass the classes to stratify.
    confidence: the interval's coverage, 0.95 for the 2.5th to 97.5th percentiles.

  Returns:
    ``{name: {"value", "lo", "hi", "n_boot"}}`` in the statistic's key order: the point
    estimate, the interval, and how many resamples gave a finite value (the others are skipped).
  """
  point = dict(statistic(np.arange(num_cases)))
  draws = np.full((n_boot, len(point)), np.nan)
  for b, idx in enumerate(resample_indices(num_cases, n_boot, seed, strata)):
    values = statistic(idx)
    draws[b] = [values.get(name, np.nan) for name in point]
  return {name: _interval(value, draws[:, j], confidence)
          for j, (name, value) in enumerate(point.items())}


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float | Mapping[str, float]],
                 labels: np.ndarray, probs: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0,
                 confidence: float = CONFIDENCE,
                 stratify: bool = True) -> Interval | dict[str, Interval]:
  """Bootstrap interval of ``metric_fn(labels, probs)``, cases resampled within each class.

  Args:
    metric_fn: ``(labels, probs) -> value`` or ``-> {name: value}``; NaN where undefined.
    labels: ``[N]`` integer classes (or ``[N, K]`` multi-label targets with ``stratify=False``).
    probs: ``[N, ...]`` predictions, resampled along the first axis with ``labels``.
    n_boot, seed, confidence: see `bootstrap`.
    stratify: resample within each class, keeping the class counts of ``labels``.

  Returns:
    ``{"value", "lo", "hi", "n_boot"}``, or a mapping of them when ``metric_fn`` returns one.
  """
  labels, probs = np.asarray(labels), np.asarray(probs)
  if len(labels) != len(probs):
    raise ValueError(f"{len(labels)} labels for {len(probs)} predictions")

  def statistic(idx: np.ndarray) -> Mapping[str, float]:
    value = metric_fn(labels[idx], probs[idx])
    return value if isinstance(value, Mapping) else {_SCALAR: value}

  out = bootstrap(statistic, len(labels), n_boot=n_boot, seed=seed, confidence=confidence,
                  strata=labels if stratify else None)
  return out[_SCALAR] if list(out) == [_SCALAR] else out


# --- The report


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} classes")
  return names


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
  names = _class_names(class_names, k)
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
  names = _class_names(class_names, k)
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
  names = _class_names(label_names, labels.shape[1])

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


# --- Plots: arrays in, a PNG out. Figures are built without pyplot, so no global backend or state.


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
  names = _class_names(class_names, k)
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
