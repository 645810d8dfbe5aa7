r"""The quickstart recipe's quality and cost: val ACC/AUC, training time and FLOPs per seed.

Trains ``--config`` once per seed with ``launch.py`` (the README's own command, one process at a
time) and prints one JSON line per seed and a summary line. Training FLOPs are XLA's count for one
train step (forward + backward of the config's model at its batch size, XLA's own convolutions)
times the run's steps, so recipes compare by compute, not by this machine's speed.

  MEDJAX_DATA_DIR=../shared/data python benchmarks/quickstart_recipe.py --seeds 0,1,2
  # a recipe variant, and the same recipe on the train split cut to 546 images:
  ... --set model.kwargs.width=32 --set train.epochs=12 --train_limit 546

``--train_limit N`` writes a copy of the MedMNIST file whose train split holds N images drawn at
random (seed 0, both classes kept in proportion) into the output folder and trains on that.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def cut_train_split(data_root: str, name: str, size: int, limit: int, out: str) -> str:
  """A MedMNIST folder under ``out`` whose train split keeps ``limit`` images (stratified)."""
  from medjax.io import medmnist

  src = os.path.join(data_root, "medmnist", medmnist.get_info(name, size).filename(size))
  with np.load(src, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  labels = arrays["train_labels"].reshape(len(arrays["train_labels"]), -1)[:, 0]
  rng = np.random.default_rng(0)
  keep = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    keep.append(rng.choice(idx, int(round(limit * len(idx) / len(labels))), replace=False))
  keep = np.sort(np.concatenate(keep))[:limit]
  arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], \
      arrays["train_labels"][keep]
  folder = os.path.join(out, "medmnist")
  os.makedirs(folder, exist_ok=True)
  np.savez(os.path.join(folder, os.path.basename(src)), **arrays)
  return folder


def step_flops(config) -> float:
  """XLA's FLOP count of one train step (forward + backward) of ``config``'s model."""
  import jax
  import jax.numpy as jnp

  from medjax import models, ops, registry  # noqa: F401  (models: registers the zoo)
  from medjax.train import tasks

  size, bs = config.data.size, config.train.batch_size
  model = registry.lookup(f"models.{config.model.name}")(num_classes=2, **config.model.kwargs)
  x = jnp.zeros((bs, size, size, 1), jnp.float32)
  y = jnp.zeros((bs,), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
  task = tasks.get_task("classification")

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return task.loss_fn(logits, {"label": y}).mean()

  with ops.portable():  # XLA's own convolutions, whose FLOPs XLA counts
    compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/pneumoniamnist_resnet18.py")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--set", action="append", default=[], help="a config override, key=value")
  p.add_argument("--train_limit", type=int, default=0)
  p.add_argument("--out", default="/tmp/medjax-quickstart")
  p.add_argument("--flops_only", action="store_true", help="print the step's FLOPs; no training")
  args = p.parse_args()

  data_root = os.environ.get("MEDJAX_DATA_DIR", os.path.join(REPO, "..", "shared", "data"))
  overrides = [f"--config.{s}" for s in args.set]
  tag = "_".join(s.replace("=", "-").replace(".", "-") for s in args.set) or "default"
  if args.train_limit:
    tag += f"_n{args.train_limit}"
  out = os.path.join(args.out, tag)
  os.makedirs(out, exist_ok=True)

  # The config as launch.py builds it (its own flag parsing applies the overrides to the runs).
  module = importlib.import_module(
      os.path.splitext(os.path.relpath(args.config, REPO))[0].replace(os.sep, "."))
  config = module.get_config()
  for s in args.set:
    key, value = s.split("=", 1)
    *path, last = key.split(".")
    node = config
    for k in path:
      node = node[k]
    node[last] = ast.literal_eval(value)
  if args.train_limit:
    folder = cut_train_split(data_root, config.data.name, config.data.size, args.train_limit, out)
    overrides.append(f"--config.data.dir={folder}")
  flops = step_flops(config)
  if args.flops_only:
    print(json.dumps({"recipe": args.set, "step_gflops": round(flops / 1e9, 1)}))
    return

  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    workdir = os.path.join(out, f"seed{seed}")
    cmd = [sys.executable, os.path.join(REPO, "launch.py"), f"--config={args.config}",
           f"--workdir={workdir}", f"--config.seed={seed}", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, MEDJAX_DATA_DIR=data_root),
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "summary.json")) as f:
      s = json.load(f)
    row = {"seed": seed, "val_acc": s["best"]["acc"], "val_auc": s["best"]["auc"],
           "steps": s["steps"], "best_step": s["best_step"],
           "train_seconds": round(s["train_seconds"], 1),
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "train_pflops": round(flops * s["steps"] / 1e15, 3)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(json.dumps({"recipe": args.set, "train_limit": args.train_limit,
                    "step_gflops": round(flops / 1e9, 1),
                    "min_val_acc": min(r["val_acc"] for r in rows),
                    "min_val_auc": min(r["val_auc"] for r in rows),
                    "mean_train_seconds": round(np.mean([r["train_seconds"] for r in rows]), 1)}))


if __name__ == "__main__":
  main()
