"""The sweep's leaderboard: members ranked by their best checkpoint's metric, as CSV and Markdown."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from typing import Any, Sequence

from medjax.io.atomic import atomic_write
from medjax.sweep.spec import Member
from medjax.train import runs


class Leaderboard:
  """``leaderboard.csv`` / ``leaderboard.md``: members ranked by the best checkpoint's metric.

  Args:
    workdir: the sweep folder.
    members: every member of the sweep, in order.
    best_metric: ``eval.best_metric``; higher is better, as in checkpoint selection, and a tie
      goes to the member with the lower index.
    split: ``eval.split``, the split the metric is measured on.
  """

  def __init__(self, workdir: str, members: Sequence[Member], best_metric: str, split: str):
    self.workdir, self.members = workdir, list(members)
    self.best_metric, self.split = best_metric, split
    self.metric_label = f"{split}_{best_metric}"

  def summary(self, m: Member) -> dict[str, Any] | None:
    if m.status != "done":
      return None
    return runs.read_summary(m.workdir)

  def metric(self, m: Member) -> float:
    s = self.summary(m)
    v = (s or {}).get("best", {}).get(self.best_metric)
    return float(v) if isinstance(v, (int, float)) else math.nan

  def wall_seconds(self) -> dict[str, float]:
    """Each member's wall time over all its attempts (an attempt cut short by SIGKILL of the
    sweep is not recorded)."""
    total: dict[str, float] = {}
    path = os.path.join(self.workdir, "attempts.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        for ln in f:
          with contextlib.suppress(ValueError, KeyError):
            a = json.loads(ln)
            total[a["member"]] = total.get(a["member"], 0.0) + a["seconds"]
    return total

  def write(self) -> Member | None:
    """Rewrites both files; returns the best finished member, if any."""
    scored = [(m, self.metric(m)) for m in self.members if self.summary(m) is not None]
    ranked = sorted(scored, key=lambda p: (math.isnan(p[1]), -p[1] if p[1] == p[1] else 0,
                                           p[0].index))
    rank = {m.name: i + 1 for i, (m, _) in enumerate(ranked)}
    best = ranked[0][0] if ranked and not math.isnan(ranked[0][1]) else None
    order = [m for m, _ in ranked] + [m for m in self.members if m.name not in rank]
    keys = list(dict.fromkeys(k for m in self.members for k in m.overrides))
    others = sorted({k for m in order for k in ((self.summary(m) or {}).get("best") or {})} -
                    {self.best_metric})
    wall = self.wall_seconds()
    header = (["rank", "member", "best", "status", self.metric_label] +
              [f"{self.split}_{k}" for k in others] +
              ["best_step", "steps", "wall_seconds"] + keys + ["error"])
    rows = []
    for m in order:
      s = self.summary(m) or {}
      metrics = s.get("best") or {}
      rows.append([rank.get(m.name, ""), m.name, int(m is best), m.status,
                   metrics.get(self.best_metric, "")] + [metrics.get(k, "") for k in others] +
                  [s.get("best_step", ""), s.get("steps", ""),
                   round(wall[m.name], 1) if m.name in wall else ""] +
                  [m.overrides.get(k, "") for k in keys] + [m.error])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header] + rows)
    atomic_write(os.path.join(self.workdir, "leaderboard.csv"), text.getvalue())
    atomic_write(os.path.join(self.workdir, "leaderboard.md"), self._markdown(header, rows, best))
    return best

  def _markdown(self, header: list[str], rows: list[list[Any]], best: Member | None) -> str:
    done = sum(m.status == "done" for m in self.members)
    lines = [f"# Sweep leaderboard: {os.path.basename(self.workdir)}", "",
             f"{done} of {len(self.members)} members finished, ranked by `{self.metric_label}` of "
             "each member's best checkpoint (higher is better). Each member's run, with its "
             "`results.md`, is in the folder of its name; its output is in `logs/`.", ""]
    if best is not None:
      lines += [f"Best: **{best.name}**.", ""]
    cols = [c for c in header if c not in ("best", "error")]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
      cells = dict(zip(header, row))
      if cells["best"]:
        cells["member"] = f"**{cells['member']}** (best)"
      lines.append("| " + " | ".join(self._md_cell(c, cells[c]) for c in cols) + " |")
    errors = [(row[1], row[-1]) for row in rows if row[-1] and row[3] != "pruned"]
    if errors:
      lines += ["", "Failures:", ""] + [f"- {n}: `{e}`" for n, e in errors]
    return "\n".join(lines) + "\n"

  def _md_cell(self, column: str, v: Any) -> str:
    if isinstance(v, float) and column.startswith(f"{self.split}_"):
      return f"{v:.4f}"  # metrics as results.md prints them; overrides exactly
    return str(v).replace("|", "\\|")
