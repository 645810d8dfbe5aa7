r"""The BraTS fusion ablation: FLAIR only, T1 only, early and late fusion, 4 case-level folds.

  python benchmarks/brats_fusion_ablation.py [--runs runs/brats_ablation] [--train]
      [--variants flair,t1,early,late] [--out runs/brats_ablation/ablation.md]

Each (variant, fold) is one ``launch.py`` run of ``configs/brats_fusion_unet.py:<variant>,cpu``
with ``--config.data.fold=<fold>`` in ``<runs>/<variant>_f<fold>``; ``--train`` trains the
ones not finished, one at a time, each fold's runs holding ``/tmp/medjax-heavy.lock`` (what
``flock`` takes, so heavy jobs on a shared machine run in turn) and not while
``/tmp/medjax-quiet`` exists, otherwise the finished runs are only read. Every case is in
exactly one fold's validation, so each variant gets one out-of-fold whole-tumour Dice per case
(from the run's sliding-window validation, `medjax.infer.segment.validate`).

The table: per variant, the mean Dice over the cases with its 95 % percentile bootstrap interval
(cases resampled, `medjax.metrics.bootstrap`), and the paired comparison of each fusion against
the better single modality (the one with the higher mean): the mean per-case difference with its
bootstrap interval, and how many cases it wins. Written as Markdown to ``--out`` and printed,
with a JSON copy beside it; docs/brats_fusion.md holds the table it gave.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)

from medjax.metrics import bootstrap  # noqa: E402
from medjax.train import runs  # noqa: E402

CONFIG = "configs/brats_fusion_unet.py"
SINGLE = ("flair", "t1")
NAMES = {"flair": "FLAIR only", "t1": "T1 only", "early": "early fusion",
         "late": "late fusion", "gated": "gated fusion"}
FOLDS = 4
LOCK = "/tmp/medjax-heavy.lock"  # heavy jobs on the shared machine take it in turn
QUIET = "/tmp/medjax-quiet"  # present while someone on the machine is timing


def workdir(root: str, variant: str, fold: int) -> str:
  return os.path.join(root, f"{variant}_f{fold}")


@contextlib.contextmanager
def heavy_lock():
  """Holds ``LOCK`` (as ``flock LOCK`` would), then waits while ``QUIET`` exists."""
  with open(LOCK, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    while os.path.exists(QUIET):
      time.sleep(30)
    yield


def train(root: str, variant: str, fold: int, extra: list[str]) -> float:
  """Trains and validates one run by launch.py; its wall seconds."""
  cmd = [sys.executable, os.path.join(_ROOT, "launch.py"),
         f"--config={os.path.join(_ROOT, CONFIG)}:{variant},cpu",
         f"--workdir={workdir(root, variant, fold)}", f"--config.data.fold={fold}", *extra]
  print("+", " ".join(cmd), flush=True)
  # The folds of a variant share their preprocessed cases (the cache is keyed by the plan) and
  # their compiled programs (JAX's persistent cache): the runs differ only in their cases.
  cmd.append(f"--config.data.cache_dir={os.path.join(root, 'preprocessed')}")
  env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax-cache"), **os.environ,
         "PYTHONPATH": _ROOT}
  t0 = time.time()
  subprocess.run(cmd, check=True, cwd=_ROOT, env=env)
  return time.time() - t0


def read_runs(root: str, variants: list[str], folds: int = FOLDS) -> dict[str, dict]:
  """Per variant: ``{"dice": {case: dice}, "train_seconds", "validation_seconds", "steps"}``,
  the last three one entry per fold.

  Raises:
    SystemExit: a run that is not finished, named (``--train`` trains it).
  """
  out = {}
  for v in variants:
    dice, seconds, val_seconds, steps = {}, [], [], []
    for fold in range(folds):
      wd = workdir(root, v, fold)
      val = runs.read_summary(wd, runs.VALIDATION)
      trained = runs.read_summary(wd)
      if val is None or trained is None:
        sys.exit(f"error: {wd}: not a finished run (train it with --train)")
      for case in val["per_case"]:
        dice[case["case"]] = float(case["1"]["dice"])  # class 1: the whole tumour
      seconds.append(float(trained["train_seconds"]))
      val_seconds.append(float(val["seconds"]))
      steps.append(int(trained["steps"]))
    out[v] = {"dice": dice, "train_seconds": seconds, "validation_seconds": val_seconds,
              "steps": steps}
  cases = [sorted(r["dice"]) for r in out.values()]
  if any(c != cases[0] for c in cases):
    sys.exit("error: the variants' runs validated different cases (different splits.json?)")
  return out


def table(results: dict[str, dict], n_boot: int = bootstrap.N_BOOT) -> tuple[str, dict]:
  """The Markdown table and its numbers (see the module docstring)."""
  cases = sorted(next(iter(results.values()))["dice"])
  dice = {v: np.array([r["dice"][c] for c in cases]) for v, r in results.items()}

  def mean_ci(x: np.ndarray) -> dict:
    return bootstrap.bootstrap(lambda i: {"mean": float(np.mean(x[i]))}, len(x),
                               n_boot=n_boot, seed=0)["mean"]

  singles = [v for v in dice if v in SINGLE]
  best = max(singles, key=lambda v: dice[v].mean()) if singles else None
  rows, numbers = [], {"cases": cases, "best_single": best, "variants": {}}
  head = ("| input | whole-tumour Dice, mean [95 % CI] | fused − best single [95 % CI] | "
          "cases fused > best single | " + " | ".join(cases) + " | train + validation s/run |")
  rows += [head, "|" + "---|" * (head.count("|") - 1)]
  for v, x in dice.items():
    ci = mean_ci(x)
    entry = {"dice": dict(zip(cases, x.tolist())), "mean": ci,
             **{k: results[v][k] for k in ("train_seconds", "validation_seconds", "steps")}}
    paired, wins = "", ""
    if best and v not in SINGLE:
      diff = x - dice[best]
      entry["minus_best_single"] = mean_ci(diff)
      d = entry["minus_best_single"]
      paired = f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
      entry["wins"] = int(np.sum(diff > 0))
      wins = f"{entry['wins']} / {len(cases)}"
    numbers["variants"][v] = entry
    rows.append(f"| {NAMES.get(v, v)} | {ci['value']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}] | "
                f"{paired} | {wins} | " + " | ".join(f"{d:.3f}" for d in x) +
                f" | {np.mean(results[v]['train_seconds']):.0f} + "
                f"{np.mean(results[v]['validation_seconds']):.0f} |")
  return "\n".join(rows) + "\n", numbers


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="runs/brats_ablation", help="folder of the 4 × variants runs")
  p.add_argument("--variants", default="flair,t1,early,late",
                 help=f"comma-separated, of {', '.join(NAMES)}")
  p.add_argument("--train", action="store_true", help="train the runs not finished yet")
  p.add_argument("--out", default="", help="Markdown table (default: <runs>/ablation.md)")
  p.add_argument("--n_boot", type=int, default=bootstrap.N_BOOT)
  p.add_argument("--folds", type=int, default=FOLDS, choices=range(1, FOLDS + 1),
                 help="the table of the first N folds only (while the others train)")
  p.add_argument("extra", nargs="*", help="more launch.py flags for --train, after --")
  args = p.parse_args()
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in NAMES]
  if unknown:
    print(f"error: --variants: unknown {', '.join(unknown)}; known: {', '.join(NAMES)}",
          file=sys.stderr)
    return 2
  root = os.path.abspath(args.runs)
  if args.train:
    for fold in range(FOLDS):  # fold-major: a partial sequence still compares the variants
      if all(runs.is_finished(workdir(root, v, fold)) for v in variants):
        continue
      with heavy_lock():  # one fold's runs in one turn (each run waiting its turn took longer)
        for v in variants:
          if not runs.is_finished(workdir(root, v, fold)):
            print(f"{v} fold {fold}: {train(root, v, fold, args.extra):.0f} s", flush=True)
  text, numbers = table(read_runs(root, variants, args.folds), args.n_boot)
  out = args.out or os.path.join(root, "ablation.md")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(numbers, f, indent=1)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
