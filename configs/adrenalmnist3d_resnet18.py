r"""AdrenalMNIST3D (28³ abdominal CT, normal vs adrenal hyperplasia) with a 3-D ResNet-18.

Run:
  python launch.py --config configs/adrenalmnist3d_resnet18.py --workdir runs/adrenal
Variants, comma-separated after the colon: ``cpu`` (a stride-2 stem, about 10× cheaper: the one
to train on a few CPU cores) and ``runlocal`` (a seconds-long smoke run), e.g. ``:cpu,runlocal``.

The default keeps stage 1 at the full 28³, like MedMNIST's small-input ResNets and the 2-D
PneumoniaMNIST config: on a GPU it scored a higher val AUC than the ``cpu`` stem on every seed,
but its step is too slow for a few CPU cores. Figures and the variants tried: docs/results.md.
"""

from configs import common

VARIANTS = ("cpu", "runlocal")


def get_config(arg: str | None = None):
  args = common.parse_variants(arg, VARIANTS)
  c = common.get_base_config()
  c.data.name = "adrenalmnist3d"
  c.data.size = 28
  # Left-right flips and a small affine: 1,188 training volumes are few for a 3-D network.
  c.data.train_transforms = (
      "to_float|flip(axes=(2,))|affine(rotate=10, scale=0.1, translate=0.05)|normalize(0.5, 0.5)")
  c.model.name = "resnet18"
  c.model.kwargs.stem_kernel = 3
  c.model.kwargs.stem_stride = 1
  c.model.kwargs.stem_pool = False
  if "cpu" in args:
    # Stage 1 at 14³ instead of 28³: 8× fewer voxels where most of the compute is.
    c.model.kwargs.stem_stride = 2
  c.train.batch_size = 32
  c.train.epochs = 10.0
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-2
  if "runlocal" in args:
    common.runlocal(c)
  return c
