r"""AdrenalMNIST3D (28³ abdominal CT) read slice by slice: a small 2-D CNN encodes each axial slice
with its two neighbours on each side as channels, a bidirectional LSTM runs over the slices and
attention pools them (``models.slice_lstm``).

Data, optimiser and schedule are the 3-D ResNet-18's (``adrenalmnist3d_resnet18.py``), and its
augmentation minus the affine (see below); ``adrenalmnist3d_gru.py``
and ``adrenalmnist3d_2p5d.py`` derive from this file the same way.

Run:
  python launch.py --config configs/adrenalmnist3d_lstm.py --workdir runs/adrenal_lstm
Variants, comma-separated after the colon: ``64`` (the 64³ file, adrenalmnist3d_64.npz) and
``runlocal`` (a seconds-long smoke run), e.g. --config configs/adrenalmnist3d_lstm.py:64,runlocal
"""

import ml_collections

from configs import adrenalmnist3d_resnet18, common

VARIANTS = ("64", "runlocal")


def parse_arg(arg: str | None) -> set[str]:
  """The variants named in ``arg`` (``"64,runlocal"``); see `common.parse_variants`."""
  return common.parse_variants(arg, VARIANTS)


def get_config(arg: str | None = None, cell: str = "lstm"):
  args = parse_arg(arg)
  c = adrenalmnist3d_resnet18.get_config()
  c.model.name = f"slice_{cell}"
  # Flips only, no affine. The per-slice encoder's BatchNorm keeps running statistics of the
  # training slices, and those of affine-resampled slices (mostly empty shape masks, so tiny
  # variances) misnormalise the unaugmented val slices; precise BN mends ACC but not AUC
  # (docs/results.md).
  c.data.train_transforms = "to_float|flip(axes=(2,))|normalize(0.5, 0.5)"
  # A small per-slice CNN (28² → 14² → 7², 64 features): several times cheaper than the 3-D
  # ResNet-18; "resnet18(width=32, stem_stride=2)" is the bigger encoder (docs/performance.md).
  c.model.kwargs = ml_collections.ConfigDict({
      "slice_axis": "axial",  # axis 1 of [B, D, H, W, C]
      "slice_stride": 1,
      # Two neighbouring slices each side as extra encoder channels (a 5-slice slab per step):
      # each added neighbour raised val AUC (docs/results.md).
      "context": 2,
      "encoder": "small_cnn(features=(16, 32, 64))",
      "hidden": 128,
      "num_layers": 1,
      "bidirectional": True,
      "pooling": "attention",  # intermediates/slice_attention shows which slices decided
      "dropout": 0.1,
  })
  if "64" in args:
    c.data.size = 64
    # A stride-2 stem: 64² slices are encoded at 32², so a step costs about what 28³ does per
    # slice; every second slice steps the RNN, and its 5-slice slab still covers the slices
    # skipped (32 steps instead of 64: half the cost).
    c.model.kwargs.encoder = "small_cnn(features=(16, 32, 64), stem_stride=2)"
    c.model.kwargs.slice_stride = 2
  if "runlocal" in args:
    common.runlocal(c)
    c.model.name = f"slice_{cell}"  # common.runlocal swaps in resnet_tiny
    c.model.kwargs.encoder = "small_cnn(features=(4, 8), stem_stride=2)"
    c.model.kwargs.hidden = 16
  return c
