"""When a run folder holds a finished run: the one place that writes and reads that marker.

A run is finished once its summaries are written, each last and atomically: ``summary.json``
by the training loop, and for segmentation runs also ``validation/summary.json`` by the
sliding-window validation (`medjax.infer.segment.validate`, which launch.py runs after training).
The sweep skips members that `is_finished`; no other code looks for these files by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

from medjax.io.atomic import atomic_write_json

TRAINING, VALIDATION = "training", "validation"
_SUMMARIES = {TRAINING: "summary.json", VALIDATION: os.path.join("validation", "summary.json")}


def summary_path(workdir: str, stage: str = TRAINING) -> str:
  """Where ``stage``'s summary (``training`` | ``validation``) lives in ``workdir``."""
  return os.path.join(workdir, _SUMMARIES[stage])


def stages(task: str | None) -> tuple[str, ...]:
  """The stages a run of ``task`` must finish: training, and validation for segmentation."""
  return (TRAINING, VALIDATION) if task == "segmentation" else (TRAINING,)


def mark_finished(workdir: str, summary: dict[str, Any], stage: str = TRAINING,
                  indent: int = 2) -> None:
  """Writes ``stage``'s summary atomically; call it last, after every other output of the stage."""
  path = summary_path(workdir, stage)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_json(path, summary, indent=indent, default=float)


def read_summary(workdir: str, stage: str = TRAINING) -> dict[str, Any] | None:
  """``stage``'s summary, or None when it is missing or unreadable."""
  try:
    with open(summary_path(workdir, stage)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_finished(workdir: str, config: dict[str, Any] | None = None) -> bool:
  """Whether every stage of the run in ``workdir`` has written its summary.

  Args:
    config: the run's config as a dict (default: read from its ``config.json``); its ``task``
      says which stages the run has.
  """
  if config is None:
    try:
      with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    except (OSError, ValueError):
      return False
  return all(os.path.exists(summary_path(workdir, s)) for s in stages(config.get("task")))
