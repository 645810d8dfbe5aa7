r"""MSD Task04 Hippocampus with a 2-D U-Net on slices (nnU-Net's ``2d`` beside ``3d_fullres``).

Same plan rules, data, fold and recipe as ``hippocampus_unet3d.py``; the plan slices along the
coarsest axis (axis 0 on this isotropic data) with 56×40 patches.

Run:
  python launch.py --config configs/hippocampus_unet2d.py --workdir runs/hippocampus2d
Five folds with the 3-D config's hold-out (variant ``cv``), to ensemble with the 3-D folds:
  python launch.py --config configs/hippocampus_unet2d.py:cv --workdir runs/hippo_cv2d --sweep
Variant ``axial``: axial slices (axis 2 of the canonical RAS grid, 40×56 patches) instead of the
plan's sagittal ones (axis 0), a second 2-D view of the same volumes for the configurations'
ensemble (``python -m medjax.evaluate --choose``).
"""

from configs import common, hippocampus_unet3d


def get_config(arg: str | None = None):
  c = hippocampus_unet3d.get_config()
  c.data.dims = 2
  c.data.train_transforms = (
      "flip(axes=(0, 1))|affine(rotate=15, scale=0.15, translate=0.0, p=0.2)"
      "|gamma(p=0.3)|contrast(p=0.15)|noise(std=(0., 0.1), p=0.1)")
  c.train.batch_size = 32
  c.eval.batch_size = 64
  variants = common.parse_variants(arg, ("runlocal", "cv", "axial"))
  if "cv" in variants:
    c.data.holdout = hippocampus_unet3d.HOLDOUT
  if "runlocal" in variants:
    hippocampus_unet3d.runlocal(c)
  if "axial" in variants:  # after runlocal, whose tiny plan it keeps but for the slicing
    c.data.plan.slice_axis = 2
    if "runlocal" not in variants:
      c.data.plan.patch_size = [40, 56]  # axes 0 and 1 (the sagittal plan's is 56×40, axes 1, 2)
  return c


def get_sweep(arg: str | None = None):
  """The five folds (`hippocampus_unet3d.get_sweep`)."""
  common.parse_variants(arg, ("runlocal", "cv", "axial"))
  return hippocampus_unet3d.get_sweep()
