r"""BraTS 2018 FLAIR + T1 whole-tumour segmentation, the two modalities fused inside a 3-D U-Net.

Data: ``$MEDJAX_DATA_DIR/brats2018_flair_t1/case_<i>/{FLAIR,T1,GT_W}.nii.gz`` (8 cases), read as an
MSD dataset with channels (FLAIR, T1) by `medjax.io.msd` (`CASE_FOLDER_LAYOUTS`), planned like
nnU-Net (``workdir/plan.json``). Folds are whole cases: 4 folds of 2 validation cases, one run
per ``--config.data.fold``.

Fusion (`medjax.models.fusion`), a variant: ``early`` (default; channels stacked at the input),
``late`` (one encoder per modality, every level fused by concatenation + 1×1×1 conv) or ``gated``
(Chen et al. 2019's learned per-modality gates). ``dropout``: ``train.modality_dropout = 0.25``,
so the run can predict with a modality missing (``predict --channels FLAIR
--fill_missing_channels``). ``runlocal``: a seconds-long smoke run on a tiny network.

Single modality, the ablation's baselines: ``flair`` or ``t1`` reads only that channel
(``data.channels``; the plan and prediction then take that one channel), same network and recipe.

``cpu``: the budget of the fusion ablation (docs/brats_fusion.md; 16 runs on a 2-core CPU):
volumes resampled to 2 mm (whole tumour is tens of cm³, so its Dice barely depends on the
1 mm detail; predictions are restored to the 1 mm grid before scoring), 48³ patches (96 mm,
most of a brain), STEPS_CPU steps, no mirroring in the final validation.

Run:
  python launch.py --config configs/brats_fusion_unet.py:late --workdir runs/brats_late_f0 \
      --config.data.fold=0
Quick smoke run: --config configs/brats_fusion_unet.py:gated,runlocal
"""

import ml_collections

from configs import common, hippocampus_unet3d

VARIANTS = ("early", "late", "gated", "dropout", "flair", "t1", "cpu", "runlocal")
# The ablation's training length, sized on the 2-core machine (docs/brats_fusion.md).
STEPS_CPU = 100


def get_config(arg: str | None = None):
  variants = common.parse_variants(arg, VARIANTS)
  fusions = [v for v in ("early", "late", "gated") if v in variants]
  if len(fusions) > 1:
    raise ValueError(f"choose one fusion variant, got {fusions}")
  single = [v for v in ("flair", "t1") if v in variants]
  if single and (len(single) > 1 or fusions or "dropout" in variants):
    raise ValueError(f"{', '.join(single)}: one modality, so no fusion or modality dropout "
                     f"variant with it (got {sorted(variants)})")
  c = common.get_base_config()
  c.task = "segmentation"
  c.data.source = "msd"
  c.data.name = "brats2018_flair_t1"
  c.data.dims = 3
  c.data.folds = 4  # 8 cases: 2 validation cases per fold
  c.data.channels = {"flair": ("FLAIR",), "t1": ("T1",)}.get(single[0], ()) if single else ()
  c.data.train_transforms = (
      "flip(axes=(0, 1, 2))|affine(rotate=15, scale=0.15, translate=0.0, p=0.2)"
      "|gamma(p=0.3)|contrast(p=0.15)|noise(std=(0., 0.1), p=0.1)")
  c.data.eval_transforms = ""  # evaluation patches are centred crops made by the loop
  c.model.name = "unet"
  # Half nnU-Net's widths, as hippocampus_unet3d.py: a CPU budget. One width per stage of the
  # plan (48×56×48 patches, four stages). Late and gated fusion run one encoder per modality,
  # about twice the encoder's cost.
  c.model.kwargs = ml_collections.ConfigDict({
      "norm": "instance", "deep_supervision": True, "features": [16, 32, 64, 128],
      "fusion": fusions[0] if fusions else "early"})
  c.train.batch_size = 2
  c.train.steps = 1500
  c.train.log_every_steps = 20
  c.train.keep_checkpoints = 1
  c.train.modality_dropout = 0.25 if "dropout" in variants else 0.0
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 3e-5
  c.optim.warmup_fraction = 0.02
  c.optim.grad_clip_norm = 12.0  # nnU-Net clips at 12
  c.eval.every_steps = 250
  c.eval.batch_size = 2
  c.eval.best_metric = "dice"
  if "cpu" in variants:
    c.data.plan = ml_collections.ConfigDict({
        "target_spacing": [2.0, 2.0, 2.0], "patch_size": [48, 48, 48],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]})
    c.train.steps = STEPS_CPU
    c.optim.warmup_fraction = 0.05
    c.eval.every_steps = STEPS_CPU  # one evaluation, at the end; the final validation scores
    c.eval.mirror = False
  if "runlocal" in variants:
    hippocampus_unet3d.runlocal(c)
    c.train.batch_size = c.eval.batch_size = 2
    # Bigger windows than the hippocampus smoke run's: the final sliding-window validation
    # tiles two whole brains.
    c.data.plan.patch_size = [32, 32, 32]
    c.eval.mirror = False
  return c
