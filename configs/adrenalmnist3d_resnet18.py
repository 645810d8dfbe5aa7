r"""AdrenalMNIST3D (28³ abdominal CT, normal vs adrenal hyperplasia) with a 3-D ResNet-18.

Run:
  python launch.py --config configs/adrenalmnist3d_resnet18.py --workdir runs/adrenal
Quick smoke run: --config configs/adrenalmnist3d_resnet18.py:runlocal
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_base_config()
  c.data.name = "adrenalmnist3d"
  c.data.size = 28
  # Left-right flips and a small affine: 1,188 training volumes are few for a 3-D network.
  c.data.train_transforms = (
      "to_float|flip(axes=(2,))|affine(rotate=10, scale=0.1, translate=0.05)|normalize(0.5, 0.5)")
  c.model.name = "resnet18"
  # A stride-2 stem: stage 1 runs at 14³ instead of 28³ (8× fewer voxels), which is what makes
  # a 3-D ResNet-18 trainable on a 2-core CPU.
  c.model.kwargs.stem_stride = 2
  c.train.batch_size = 32
  c.train.epochs = 10.0
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-2
  if arg == "runlocal":
    common.runlocal(c)
  return c
