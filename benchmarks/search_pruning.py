r"""Pruning benchmark: the same 8-point Optuna grid search on real PneumoniaMNIST, unpruned and with
successive halving; member-steps and the best member of each.

  MEDJAX_DATA_DIR=/work/shared/data flock /tmp/medjax-heavy.lock \
      python benchmarks/search_pruning.py --out /tmp/search_pruning [--steps 160]

Members: configs/pneumoniamnist_resnet18.py with ``--steps`` steps each (default 160, not the
config's 432: both sweeps have to fit a 2-core CPU in about half an hour), evaluated every 20
steps; learning rate {3e-4, 1e-3, 3e-3, 1e-2} x weight decay {1e-4, 1e-2}, run one member at a
time in the grid's order, so both sweeps train the same members in the same order and the pruned
one differs only in the pruner. Prints a Markdown table (the one in docs/cluster.md) and writes
it to ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = '''\
"""The benchmark's members: PneumoniaMNIST, {steps} steps, evaluated every 20."""
import sys
sys.path.insert(0, {repo!r})
from configs import pneumoniamnist_resnet18


def get_config(arg=None):
  c = pneumoniamnist_resnet18.get_config()
  c.train.epochs = None
  c.train.min_steps = 0
  c.train.steps = {steps}
  c.eval.every_steps = 20
  return c


def get_sweep(arg=None):
  pruned = arg == "pruned"
  return {{"search": {{
      "space": {{"optim.lr": [3e-4, 1e-3, 3e-3, 1e-2], "optim.weight_decay": [1e-4, 1e-2]}},
      "sampler": "grid", "n_trials": 8, "study_name": arg,
      "pruner": "halving" if pruned else None,
      "pruner_kwargs": {{"min_resource": 40, "reduction_factor": 2}} if pruned else {{}}}}}}
'''


def run_sweep(out: str, variant: str) -> tuple[list[dict[str, str]], float]:
  workdir = os.path.join(out, variant)
  cmd = [sys.executable, os.path.join(REPO, "launch.py"),
         f"--config={os.path.join(out, 'bench_config.py')}:{variant}", f"--workdir={workdir}",
         "--sweep", "--sweep_workers=1"]
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=REPO, check=True)
  seconds = time.perf_counter() - t0
  with open(os.path.join(workdir, "leaderboard.csv")) as f:
    return list(csv.DictReader(f)), seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=160)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_config.py"), "w") as f:
    f.write(_CONFIG.format(repo=REPO, steps=args.steps))
  results = {v: run_sweep(args.out, v) for v in ("unpruned", "pruned")}
  lines = ["| sweep | members done / pruned | member-steps | share | best member | val AUC | "
           "wall |", "|---|---|---|---|---|---|---|"]
  full = sum(int(r["steps"]) for r in results["unpruned"][0])
  for variant, (rows, seconds) in results.items():
    steps = sum(int(r["steps"]) for r in rows if r["steps"])
    best = next(r for r in rows if r["best"] == "1")
    point = f"lr={float(best['optim.lr']):g}, wd={float(best['optim.weight_decay']):g}"
    done = sum(r["status"] == "done" for r in rows)
    pruned = sum(r["status"] == "pruned" for r in rows)
    lines.append(f"| {variant} | {done} / {pruned} | {steps} | {steps / full:.0%} | {point} | "
                 f"{float(best['val_auc']):.4f} | {seconds / 60:.1f} min |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  print(textwrap.dedent(table))


if __name__ == "__main__":
  main()
