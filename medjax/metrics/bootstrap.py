"""Percentile bootstrap intervals over cases (stratified by class where asked)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping

import numpy as np

N_BOOT = 1000
CONFIDENCE = 0.95
_SCALAR = "__value__"  # bootstrap_ci's key for a metric_fn that returns a single float.

# {"value", "lo", "hi", "n_boot"}: the point estimate, the interval, and the resamples it rests on.
Interval = dict[str, float | int]


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
