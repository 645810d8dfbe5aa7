r"""MSD Task04 Hippocampus (MRI, anterior/posterior hippocampus) with a 3-D U-Net, nnU-Net style.

The plan (patch 40×56×40 at 1 mm, four stages) comes from the dataset's fingerprint and is
written to ``workdir/plan.json``; validation is fold 0 of a 5-fold split.

Run:
  python launch.py --config configs/hippocampus_unet3d.py --workdir runs/hippocampus3d
Quick smoke run: --config configs/hippocampus_unet3d.py:runlocal

Five-fold cross-validation (variant ``cv``: the `HOLDOUT` cases kept out of every fold), the
folds as sweep members, then the cross-validation report and post-processing decision, and the
fold ensemble on the held-out cases (docs/crossval.md):
  python launch.py --config configs/hippocampus_unet3d.py:cv --workdir runs/hippo_cv --sweep
  python -m medjax.evaluate --cv runs/hippo_cv [--holdout]
"""

import ml_collections

from configs import common

# 20 of the 208 cases, kept out of the plan and of all five folds by the ``cv`` variant: the test
# set of the fold ensemble and the post-processing. The 20 case ids with the lowest SHA-1 digest,
# `medjax.planning.hash_holdout(case_ids, 20)` (tests/planning/test_holdout.py checks the list).
HOLDOUT = (
    "hippocampus_019", "hippocampus_036", "hippocampus_084", "hippocampus_096",
    "hippocampus_142", "hippocampus_149", "hippocampus_169", "hippocampus_171",
    "hippocampus_177", "hippocampus_230", "hippocampus_233", "hippocampus_251",
    "hippocampus_263", "hippocampus_269", "hippocampus_296", "hippocampus_327",
    "hippocampus_373", "hippocampus_374", "hippocampus_381", "hippocampus_387")


def get_config(arg: str | None = None):
  c = common.get_base_config()
  c.task = "segmentation"
  c.data.source = "msd"
  c.data.name = "msd_task04_hippocampus"
  c.data.dims = 3
  # nnU-Net's augmentation, minus the expensive parts: mirroring on every axis, occasional
  # rotation/scaling, intensity (gamma, contrast, noise). Patches are cut first (see the loop).
  c.data.train_transforms = (
      "flip(axes=(0, 1, 2))|affine(rotate=15, scale=0.15, translate=0.0, p=0.2)"
      "|gamma(p=0.3)|contrast(p=0.15)|noise(std=(0., 0.1), p=0.1)")
  c.data.eval_transforms = ""  # evaluation patches are centred crops made by the loop
  c.model.name = "unet"
  # Half nnU-Net's widths (16–128, not 32–256): about 3× cheaper per step on a 2-core CPU, and
  # more steps is what a 40-minute budget needs (docs/performance.md).
  c.model.kwargs = ml_collections.ConfigDict({"norm": "instance", "deep_supervision": True,
                                              "features": [16, 32, 64, 128]})
  c.train.batch_size = 4
  c.train.steps = 1800
  c.train.log_every_steps = 20
  c.train.keep_checkpoints = 1
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 3e-5
  c.optim.warmup_fraction = 0.02
  c.optim.grad_clip_norm = 12.0  # nnU-Net clips at 12
  c.eval.every_steps = 250
  c.eval.batch_size = 8
  c.eval.best_metric = "dice"
  variants = common.parse_variants(arg, ("runlocal", "cv"))
  if "cv" in variants:
    c.data.holdout = HOLDOUT
  if "runlocal" in variants:
    runlocal(c)
  return c


def get_sweep(arg: str | None = None):
  """The cross-validation: one member per fold (``--sweep``; runs one after another on a CPU,
  one per accelerator where there are several). Fold k trains with seed k: its own
  initialisation, as nnU-Net's folds have, so that the fold ensemble averages networks that
  started apart (fold 0 keeps the single-fold recipe's seed 0)."""
  common.parse_variants(arg, ("runlocal", "cv"))
  return [{"data.fold": k, "seed": k} for k in range(5)]


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A seconds-long smoke run: a tiny plan and network on the same data."""
  common.runlocal(c)
  c.model.name = "unet"
  c.model.kwargs.features = [4, 8, 16]
  c.data.plan = ml_collections.ConfigDict({
      "patch_size": [16, 16, 16] if c.data.dims == 3 else [16, 16],
      "features": [4, 8, 16],
      "strides": [[1] * c.data.dims, [2] * c.data.dims, [2] * c.data.dims]})
  c.train.batch_size = 4
  c.eval.batch_size = 8
  c.eval.best_metric = "dice"
  return c
