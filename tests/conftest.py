"""Test setup: 4 fake CPU devices (data-parallel code paths run everywhere) and shared fixtures."""

import os
import sys

# Must precede any JAX import: every test process sees 4 host devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `import configs` as launch.py does

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_synthetic_medmnist(root, flag="pneumoniamnist", n_train=96, n_val=40, size=28, ndim=2,
                             seed=0, with_test=False):
  """A learnable MedMNIST-format file: class 1 images carry a bright blob, class 0 do not.

  Returns the folder to pass as ``data.dir``.
  """
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, "medmnist")
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("val", n_val)) + ((("test", n_val),) if with_test else ()):
    labels = (np.arange(n) % 2).astype(np.uint8)
    rng.shuffle(labels)
    shape = (n,) + (size,) * ndim
    images = rng.integers(0, 100, size=shape).astype(np.float32)
    c = size // 2
    sl = (slice(c - 4, c + 4),) * ndim
    for i in np.flatnonzero(labels):
      images[(i,) + sl] += 120
    arrays[f"{split}_images"] = images.clip(0, 255).astype(np.uint8)
    arrays[f"{split}_labels"] = labels[:, None]
  name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
  np.savez_compressed(os.path.join(folder, name), **arrays)
  return folder


@pytest.fixture
def synthetic_medmnist(tmp_path):
  return write_synthetic_medmnist(str(tmp_path))


@pytest.fixture
def data_root():
  root = os.environ.get("MEDJAX_DATA_DIR")
  if not root or not os.path.isdir(root):
    pytest.skip("MEDJAX_DATA_DIR is unset or missing; real data tests need ../shared/data")
  return root
