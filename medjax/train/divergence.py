"""The rule that stops a run whose loss explodes but stays finite (NaN/Inf stop it already).

A run diverges when its training loss stays above ``factor`` × the median of its recent losses
for ``patience`` consecutive steps. The median is of the last ``window`` losses that were not
themselves too high, so a diverging stretch never raises its own reference. It is armed from the
second step: with the learning-rate warmup, the first losses are the untrained model's (chance
level for a classifier), which no healthy run exceeds tenfold for long, while a run blown up by
its learning rate does within a few steps (PneumoniaMNIST at ``optim.lr=30``: 0.85, 0.77, then
377, 652, 519, ...). Healthy runs stay far below: the quickstart's noisiest steps (mixup) reach
about 5× the running median, one step at a time. While losses are too high the loop saves no
checkpoint, so the last one before the divergence is kept and named when the rule stops the run.
"""

from __future__ import annotations

import collections
import statistics


class DivergedError(FloatingPointError):
  """The training loss stayed far above its running median: the run diverged."""

  users_error = True  # the settings' to fix: one line, exit 2


class DivergenceRule:
  """Feeds on one training loss per step; `update` says when the run has diverged.

  Args:
    factor: a loss above ``factor`` × the running median counts as too high; 0 turns the rule off.
    window: how many recent (not too high) losses the median is taken over.
    patience: consecutive too-high steps that make a divergence.
  """

  def __init__(self, factor: float, window: int, patience: int):
    if factor < 0 or (factor and (factor <= 1 or window < 1 or patience < 1)):
      raise ValueError(f"train.divergence_*: factor {factor} must be 0 (off) or > 1, window "
                       f"{window} and patience {patience} >= 1")
    self.factor, self.patience = factor, patience
    self._recent: collections.deque[float] = collections.deque(maxlen=window)
    self._high: list[tuple[int, float]] = []  # the current run of too-high (step, loss)

  @property
  def first_high_step(self) -> int | None:
    """The step where the current run of too-high losses began, if any."""
    return self._high[0][0] if self._high else None

  def update(self, step: int, loss: float) -> str | None:
    """Records ``loss`` of ``step``; returns why the run diverged, or None."""
    if not self.factor:
      return None
    if self._recent:
      median = statistics.median(self._recent)
      if loss > self.factor * median:
        self._high.append((step, loss))
        if len(self._high) < self.patience:
          return None
        losses = ", ".join(f"{x:.3g}" for _, x in self._high)
        return (f"the training loss stayed above {self.factor:g} × its running median "
                f"{median:.3g} for {len(self._high)} steps from step {self._high[0][0]} "
                f"({losses})")
    self._high = []
    self._recent.append(loss)
    return None
