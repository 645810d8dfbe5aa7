r"""PneumoniaMNIST (28², paediatric chest X-ray, normal vs pneumonia) with a 2-D ResNet-18.

Run:
  python launch.py --config configs/pneumoniamnist_resnet18.py --workdir runs/pneumonia
Quick smoke run: --config configs/pneumoniamnist_resnet18.py:runlocal

Expected (val split, 2-core CPU): see README's results table.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_base_config()
  c.data.name = "pneumoniamnist"
  c.data.size = 28
  # Horizontal flips and a small affine: chest X-rays are roughly left-right symmetric at this
  # resolution, and positioning varies a little between patients.
  c.data.train_transforms = (
      "to_float|flip(axes=(1,))|affine(rotate=10, scale=0.1, translate=0.05)|normalize(0.5, 0.5)")
  c.model.name = "resnet18"
  c.train.batch_size = 128
  c.train.epochs = 4.0
  c.optim.lr = 2e-3
  c.optim.weight_decay = 5e-4
  if arg == "runlocal":
    common.runlocal(c)
  return c
