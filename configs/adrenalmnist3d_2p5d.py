r"""AdrenalMNIST3D, 2.5-D baseline: the axial slices become the channels of one 2-D ResNet-18
(``models.resnet18_2p5d``); nothing models slice order beyond the first convolution.

Data, augmentation and optimiser as the 3-D ResNet-18's (``adrenalmnist3d_resnet18.py``).

Run:
  python launch.py --config configs/adrenalmnist3d_2p5d.py --workdir runs/adrenal_2p5d
Variants as in adrenalmnist3d_lstm.py: ``64``, ``runlocal``, or both (``:64,runlocal``).
"""

import ml_collections

from configs import adrenalmnist3d_lstm, adrenalmnist3d_resnet18


def get_config(arg: str | None = None):
  args = adrenalmnist3d_lstm.parse_arg(arg)
  c = adrenalmnist3d_lstm.get_config(arg)
  # The 3-D ResNet-18's augmentation, affine included (measured with it; a 2-D ResNet over
  # slices-as-channels normalises whole volumes, not mostly-empty slices).
  c.data.train_transforms = adrenalmnist3d_resnet18.get_config().data.train_transforms
  c.model.name = "resnet18_2p5d"
  c.model.kwargs = ml_collections.ConfigDict({
      "slice_axis": "axial",
      "slice_stride": 1,
      "stem_stride": 1,  # 28² slices: MedMNIST's small-input stem, as the 2-D PneumoniaMNIST run
      "dropout": 0.1,
  })
  if "64" in args:
    c.model.kwargs.stem_stride = 2  # 64² → stage 1 at 32², about the cost of the 28² setting
  if "runlocal" in args:
    c.model.kwargs.width = 8
  return c
