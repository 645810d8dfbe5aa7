r"""Learned pixel-level fusion of one Harvard atlas pair folder (issue 26, docs/fusion.md).

A DenseFuse-style network (`medjax.models.image_fusion`) trained without targets on the pair
folder's training cases (`medjax.io.harvard`: the test cases held out, a validation case carved
from the rest), with SSIM + gradient + intensity losses (`medjax.train.fusion_losses`); the
checkpoint kept is the one with the best Qabf on the validation case.

Run (one model per pair; ``:arg`` is ``ct-mri`` (default), ``pet-mri`` or ``spect-mri``, plus
``runlocal`` for a seconds-long smoke run):
  python launch.py --config configs/harvard_fusion.py:ct-mri --workdir runs/fuse_ctmri
  python -m medjax.evaluate.fusion --out runs/fusion_eval --methods pyramid,learned \
    --workdir CT-MRI=runs/fuse_ctmri
"""

import ml_collections

from configs import common

PAIRS = {"ct-mri": "CT-MRI", "pet-mri": "PET-MRI", "spect-mri": "SPECT-MRI"}


def get_config(arg: str | None = None):
  variants = common.parse_variants(arg, (*PAIRS, "runlocal"))
  pairs = sorted(variants & set(PAIRS))
  if len(pairs) > 1:
    raise ValueError(f"one pair per run, got {', '.join(pairs)}")
  c = common.get_base_config()
  c.task = "fusion"
  # The loss's weights (medjax.train.tasks.fusion): SSIM to both sources, L1 between the fused
  # Sobel magnitude and the larger of the sources', L1 to the brighter source.
  c.task_kwargs = ml_collections.ConfigDict(
      {"ssim_weight": 1.0, "gradient_weight": 10.0, "intensity_weight": 1.0})
  c.data.source = "harvard"
  c.data.name = PAIRS[pairs[0] if pairs else "ct-mri"]
  c.data.dir = ""  # empty: $MEDJAX_DATA_DIR/fusion/harvard_aanlib
  # Random 128² crops (the network is fully convolutional; a quarter of the 256² slice's cost),
  # flips and quarter turns: the same geometric change for both sources.
  c.data.train_transforms = ("patch(shape=(128, 128), foreground=0.0)|flip(axes=(0, 1))"
                             "|rot90(axes=(0, 1))")
  c.data.eval_transforms = ""  # whole 256² slices
  c.model.name = "dense_fusion"
  c.model.kwargs = ml_collections.ConfigDict()  # DenseFuse's widths (the model's defaults)
  c.train.batch_size = 8
  c.train.steps = 600
  c.train.log_every_steps = 20
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.eval.batch_size = 8
  c.eval.every_steps = 100
  c.eval.best_metric = "Qabf"
  if "runlocal" in variants:
    c.data.train_transforms = "patch(shape=(16, 16), foreground=0.0)|flip(axes=(0, 1))"
    c.model.kwargs = ml_collections.ConfigDict(
        {"features": 4, "dense_layers": 1, "decoder": (8,)})
    c.train.steps = 2
    c.train.batch_size = 2
    c.train.log_every_steps = 1
    c.eval.every_steps = 2
    c.eval.batch_size = 2
  return c
