r"""AdrenalMNIST3D read slice by slice with a bidirectional GRU: ``adrenalmnist3d_lstm.py`` with
``models.slice_gru`` (a quarter fewer recurrent weights than the LSTM).

Run:
  python launch.py --config configs/adrenalmnist3d_gru.py --workdir runs/adrenal_gru
Variants as in adrenalmnist3d_lstm.py: ``64``, ``runlocal``, or both (``:64,runlocal``).
"""

from configs import adrenalmnist3d_lstm


def get_config(arg: str | None = None):
  return adrenalmnist3d_lstm.get_config(arg, cell="gru")
