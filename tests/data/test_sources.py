"""Sources: Volume → record, grid checks, and one real chain NIfTI → model-ready patch."""

import glob
import os

import numpy as np
import pytest

from medjax.data import transforms
from medjax.data.sources import volume_record
from medjax.io import nifti
from medjax.io.errors import MedjaxIOError
from medjax.io.volume import Volume


def _volume(shape=(6, 7, 8), origin=(0.0, 0.0, 0.0), dtype=np.float32):
  return Volume(np.zeros(shape + (1,), dtype), (1.0, 1.0, 2.0), origin, np.eye(3))


def test_label_on_another_grid_is_refused():
  image = _volume()
  with pytest.raises(MedjaxIOError, match="shape"):
    volume_record(image, _volume((6, 7, 9), dtype=np.uint8), label_path="lab.nii.gz")
  with pytest.raises(MedjaxIOError, match="lab.nii.gz: label map not on the image.s grid: affine"):
    volume_record(image, _volume(origin=(0.0, 0.5, 0.0), dtype=np.uint8), label_path="lab.nii.gz")
  record = volume_record(image, _volume(dtype=np.uint8))
  assert record["label"].shape == (6, 7, 8, 1)
  np.testing.assert_array_equal(record["spacing"], [1.0, 1.0, 2.0])


def test_hippocampus_chain_to_a_model_ready_patch(data_root):
  images = sorted(glob.glob(os.path.join(data_root, "msd_task04_hippocampus/imagesTr/*.nii.gz")))
  if not images:
    pytest.skip("MSD Hippocampus is missing")
  preprocess = transforms.parse(
      "resample(spacing=(1.2, 1.2, 1.5))|zscore(nonzero=True)|crop_or_pad(shape=(40, 48, 32))")
  augment = transforms.parse(
      "flip(axes=(0, 1, 2))|rotate(degrees=10)|elastic(alpha=(0., 50.), sigma=(4., 6.), p=1.)")
  intensity = transforms.parse("gamma(p=1.)|noise(p=1.)")
  rng = np.random.default_rng(0)
  for path in images[:3]:
    image = nifti.read_nifti(path, modality="MR")
    label = nifti.read_nifti_labels(path.replace("imagesTr", "labelsTr"), num_classes=3)
    record = volume_record(image, label, label_path=path)
    before = {int(k): int(np.sum(record["label"] == k)) for k in (1, 2)}
    for op in preprocess:
      record = op.map(record)
    for op in augment + intensity:
      # A copy of the label rides along as an image channel (warped linearly): where the warped
      # label (nearest) says foreground, so must the copy, or image and label came apart.
      tracer = (record["label"] > 0).astype(np.float32)
      record = {**record, "image": np.concatenate([record["image"], tracer], axis=-1)}
      record = op.random_map(record, rng)
      record, tracer = ({**record, "image": record["image"][..., :1]},
                        record["image"][..., 1:])
      if op in augment:
        agree = np.mean((tracer > 0.5) == (record["label"] > 0))
        assert agree > 0.99, (path, op, agree)
    assert record["image"].shape == (40, 48, 32, 1) and record["image"].dtype == np.float32
    assert record["label"].shape == (40, 48, 32, 1)
    assert np.all(np.isfinite(record["image"]))
    np.testing.assert_allclose(record["spacing"], [1.2, 1.2, 1.5], rtol=0.05)
    assert set(np.unique(record["label"])) <= {0, 1, 2}
    # Both structures survive; their volume in voxels shrinks by the resampling factor (1/2.16)
    # up to the augmentation's local stretching and the crop.
    for k, n in before.items():
      after = int(np.sum(record["label"] == k))
      assert 0.25 * n / 2.16 < after < 2.0 * n / 2.16, (path, k, n, after)
