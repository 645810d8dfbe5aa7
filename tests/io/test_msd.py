"""`medjax.io.msd.select_channels`: a subset of a dataset's channels, read from either layout
(one file per channel, or one 4-D file), and an unknown channel name refused."""

import os

import nibabel as nib
import numpy as np
import pytest
from conftest import write_msd

from medjax.io import msd

CHANNELS = ("FLAIR", "T1", "T2")


def _distinct_channels(root, layout):
  """Rewrites each case's channels as channel k = (k + 1) × the first, so a selection shows."""
  images = os.path.join(root, "imagesTr")
  for name in sorted(os.listdir(images)):
    path = os.path.join(images, name)
    img = nib.load(path)
    data = np.asarray(img.dataobj, np.float32)
    if layout == "msd":
      data = np.stack([data[..., 0] * (k + 1) for k in range(data.shape[-1])], -1)
    else:
      data = data * (int(name.split("_")[-1].split(".")[0]) + 1)
    nib.save(nib.Nifti1Image(data, img.affine), path)


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_selected_channels_are_read_in_the_order_asked(tmp_path, layout):
  root = write_msd(tmp_path, n=2, channels=CHANNELS, layout=layout, shape=(8, 9, 7))
  _distinct_channels(root, layout)
  full = msd.read_msd_dataset(root)
  every, _ = msd.load_msd_case(full, full.cases[0])
  subset = msd.select_channels(full, ["T2", "FLAIR"])
  assert subset.channels == ("T2", "FLAIR") and subset.file_channels == CHANNELS
  image, label = msd.load_msd_case(subset, subset.cases[0])
  np.testing.assert_array_equal(image.array, every.array[..., [2, 0]])
  assert label is not None and label.array.shape[:3] == image.array.shape[:3]
  assert msd.select_channels(full, ()) is full
  # A selection of a selection names the files' channels, not the first selection's.
  t1, _ = msd.load_msd_case(msd.select_channels(subset, ["T1"]), subset.cases[0])
  np.testing.assert_array_equal(t1.array, every.array[..., [1]])


def test_an_unknown_or_repeated_channel_is_named(tmp_path):
  full = msd.read_msd_dataset(write_msd(tmp_path, n=2, channels=CHANNELS, shape=(8, 9, 7)))
  with pytest.raises(ValueError, match=r"data.channels=\['FLAR'\]: no channel 'FLAR' .*"
                                       r"its channels: FLAIR, T1, T2"):
    msd.select_channels(full, ["FLAR"])
  with pytest.raises(ValueError, match="named twice"):
    msd.select_channels(full, ["T1", "T1"])
