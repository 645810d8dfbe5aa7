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
  c.data.train_transforms = (
      "to_float|flip(axes=(2,))|affine(rotate=10, scale=0.1, translate=0.05)|normalize(0.5, 0.5)")
  c.model.name = "resnet18"
  c.train.batch_size = 32
  c.train.epochs = 20.0
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-3
  if arg == "runlocal":
    common.runlocal(c)
  return c
