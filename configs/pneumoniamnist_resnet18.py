r"""PneumoniaMNIST (28², paediatric chest X-ray, normal vs pneumonia) with a half-width 2-D ResNet-18.

Run:
  python launch.py --config configs/pneumoniamnist_resnet18.py --workdir runs/pneumonia
Quick smoke run: --config configs/pneumoniamnist_resnet18.py:runlocal
Sweep of get_sweep() (4 members, 2 at a time):
  python launch.py --config configs/pneumoniamnist_resnet18.py --workdir runs/pneumonia_sweep \
    --sweep --sweep_workers 2
An Optuna search (TPE, median pruning; variant ``search``), which any number of such commands, on
this machine or others sharing the workdir, run together:
  python launch.py --config configs/pneumoniamnist_resnet18.py:search --workdir runs/pneumonia_tpe \
    --sweep

Expected (val split, 2-core CPU): see README's results table.
"""

from configs import common

VARIANTS = ("runlocal", "search")


def get_config(arg: str | None = None):
  c = common.get_base_config()
  c.data.name = "pneumoniamnist"
  c.data.size = 28
  # Left-right flips only: at 28² a small affine made val ACC worse (0.92 vs 0.96 after 4 epochs).
  c.data.train_transforms = "to_float|flip(axes=(1,))|normalize(0.5, 0.5)"
  c.model.name = "resnet18"
  c.train.batch_size = 128
  # Mixup (α 0.2) over 12 epochs: 432 steps here. Without it the model fits the training set and
  # val ACC is lower (docs/results.md). At least 400 steps on smaller sets: MedMNIST's protocol
  # trains 100 epochs whatever the size (546 images: ~430 steps of 128).
  c.train.mixup = 0.2
  c.train.epochs = 12.0
  c.train.min_steps = 400
  # Evaluation averages each image's prediction with its left-right flip's (the training flip).
  c.eval.flip_axes = (1,)
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-2
  if "runlocal" in common.parse_variants(arg, VARIANTS):
    common.runlocal(c)
  else:
    # Half the usual width (32-64-128-256 channels): a quarter of width 64's FLOPs for the same
    # val ACC and AUC at 28² (docs/results.md, "Quickstart recipe").
    c.model.kwargs.width = 32
    c.model.kwargs.stem_stride = 1
  return c


def get_sweep(arg: str | None = None):
  """Learning rate × weight decay around the defaults above: a 2 × 2 grid (medjax/sweep/), or
  with the ``search`` variant an Optuna search over the same ranges."""
  if "search" in common.parse_variants(arg, VARIANTS):
    # 8 trials of TPE over the same ranges, continuous; members below the median of the earlier
    # ones at the same evaluation stop there (medjax/sweep/search.py).
    return {"search": {"space": {"optim.lr": ("loguniform", 3e-4, 1e-2),
                                 "optim.weight_decay": ("loguniform", 1e-5, 1e-1)},
                       "sampler": "tpe", "seed": 0, "n_trials": 8, "pruner": "median",
                       "pruner_kwargs": {"n_startup_trials": 2}}}
  return {"optim.lr": [1e-3, 3e-3], "optim.weight_decay": [1e-4, 1e-2]}
