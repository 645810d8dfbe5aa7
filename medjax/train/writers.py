"""Run logs: ``metrics.jsonl`` plus TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax

from medjax.io.atomic import atomic_open


def _truncate_jsonl(path: str, max_step: int) -> None:
  """Drops lines logged after ``max_step`` (a killed run's tail, replayed on resume)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  if lines and not lines[-1].endswith("\n"):
    lines.pop()  # a line cut short by the kill: its step is re-done, so it is logged again
  kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= max_step]
  with atomic_open(path) as f:
    f.writelines(kept)


def _summary_writer() -> type:
  """tensorboardX's ``SummaryWriter``, imported without PyTorch.

  tensorboardX imports torch at import time when it is installed (only to accept its tensors),
  which adds seconds to every run's start; medjax writes floats only. Imported here, not at the
  top: only process 0 writes events.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends ``{"step", **scalars}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

  Args:
    workdir: run folder.
    resume_step: on resume, lines logged after this step are dropped (they are re-done).
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      _truncate_jsonl(self.path, resume_step)
      _truncate_jsonl(os.path.join(workdir, "batches.jsonl"), resume_step)
      self._tb = _summary_writer()(os.path.join(workdir, "tensorboard"),
                                   purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
             for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}, allow_nan=True) + "\n")
    for k, v in clean.items():
      if isinstance(v, float) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a ``*.jsonl`` log."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  if lines and not lines[-1].endswith("\n"):
    lines.pop()  # being written, or cut short by a kill
  return [json.loads(ln) for ln in lines]
