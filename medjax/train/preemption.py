"""SIGTERM (how SLURM and spot machines preempt) as a request to stop at the next step boundary.

The training loop checks `StopOnSignal.requested` after each step, saves a checkpoint and raises
`Preempted`; launch.py turns that into exit status `EXIT_STATUS`. With several processes, all of
them stop at the same step: any one signalled stops them all (a collective per step).
"""

from __future__ import annotations

import signal
import threading

import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# 128 + SIGTERM: what a shell reports for a process SIGTERM ended, so tooling that knows "killed by
# the scheduler" keeps working, while `launch.py && next` stops. SLURM's --requeue (and submitit,
# from its own USR2 handler) requeue a preempted job whatever its exit status.
EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint; the same command resumes it."""


class StopOnSignal:
  """While entered, ``signals`` set a flag instead of ending the process.

  Installed only in the main thread (Python delivers signals there); elsewhere it never fires.
  The previous handlers come back on exit, so a second signal after the run ends acts as usual.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self.received: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.received is None:
      logging.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                      signal.Signals(signum).name)
    self.received = signum

  def requested(self, process_count: int = 1) -> bool:
    """Whether to stop now; with several processes, whether any of them was signalled."""
    mine = self.received is not None
    if process_count == 1:
      return mine
    return bool(np.max(multihost_utils.process_allgather(np.int32(mine))))
