"""Calibration: reliability diagram, ECE, and temperature scaling (Guo et al. 2017)."""

from __future__ import annotations

import numpy as np
from scipy import optimize, special

from medjax.metrics.classification import NUM_BINS, check_inputs, nll

TEMPERATURE_BOUNDS = (0.05, 20.0)


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
