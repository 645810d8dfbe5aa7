"""NIfTI reader/writer: round trips, canonical orientation, real files, bad input."""

import glob
import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from medjax.io import nifti
from medjax.io.errors import MedjaxIOError
from medjax.io.volume import Volume


def _oblique_affine():
  q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
  affine = np.eye(4)
  affine[:3, :3] = q * [0.7, 1.1, 2.5]
  affine[:3, 3] = [-12.5, 40.0, 3.25]
  return affine


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip(tmp_path, dtype, suffix):
  array = (np.random.default_rng(0).uniform(0, 100, size=(6, 7, 8, 1))).astype(dtype)
  volume = Volume.from_affine(array, _oblique_affine())
  path = tmp_path / f"image{suffix}"
  nifti.write_nifti(volume, path)
  back = nifti.read_nifti(path, canonical=False)
  assert back.array.dtype == dtype
  np.testing.assert_array_equal(back.array, array)
  np.testing.assert_allclose(back.affine, volume.affine, atol=1e-5)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_labels_round_trip_and_validation(tmp_path):
  labels = np.random.default_rng(0).integers(0, 3, size=(5, 5, 5, 1)).astype(np.uint8)
  path = tmp_path / "labels.nii.gz"
  nifti.write_nifti(Volume.from_affine(labels, np.diag([1, 1, 1, 1.0])), path)
  back = nifti.read_nifti_labels(path, num_classes=3)
  np.testing.assert_array_equal(back.array, labels)
  with pytest.raises(MedjaxIOError, match=r"labels \[2\] outside the 2 declared classes"):
    nifti.read_nifti_labels(path, num_classes=2)
  floats = tmp_path / "float_labels.nii.gz"
  nifti.write_nifti(Volume.from_affine(labels.astype(np.float32), np.eye(4)), floats)
  assert nifti.read_nifti_labels(floats).array.dtype == np.int32
  fraction = tmp_path / "fraction.nii.gz"
  nifti.write_nifti(Volume.from_affine(labels.astype(np.float32) + 0.5, np.eye(4)), fraction)
  with pytest.raises(MedjaxIOError, match="non-integer"):
    nifti.read_nifti_labels(fraction)


def test_canonical_orientation_keeps_world_positions(tmp_path):
  array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  lps = np.diag([-1.5, -1.0, 2.0, 1.0])
  lps[:3, 3] = [30, 20, -10]
  path = tmp_path / "lps.nii.gz"
  nib.save(nib.Nifti1Image(array, lps), path)
  volume = nifti.read_nifti(path)
  assert volume.orientation == "RAS"
  np.testing.assert_allclose(volume.spacing, [1.5, 1.0, 2.0])
  world = lps @ [1, 2, 3, 1]
  index = np.round(volume.world_to_voxel(world[:3])).astype(int)
  assert volume.array[tuple(index)][0] == array[1, 2, 3]


def test_four_d_is_channels_and_five_d_is_refused(tmp_path):
  path = tmp_path / "multi.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2), np.float32), np.eye(4)), path)
  assert nifti.read_nifti(path).array.shape == (3, 4, 5, 2)
  bad = tmp_path / "five.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2, 2), np.float32), np.eye(4)), bad)
  with pytest.raises(MedjaxIOError, match="got shape"):
    nifti.read_nifti(bad)


@pytest.mark.parametrize("damage", ["missing", "empty", "text", "truncated", "not_gzip"])
def test_bad_files_name_the_file(tmp_path, damage):
  good = tmp_path / "good.nii.gz"
  noise = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
  nib.save(nib.Nifti1Image(noise, np.eye(4)), good)
  path = tmp_path / "bad.nii.gz"
  if damage == "empty":
    path.write_bytes(b"")
  elif damage == "text":
    path.write_text("hello")
  elif damage == "truncated":
    path.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  elif damage == "not_gzip":
    path.write_bytes(gzip.decompress(good.read_bytes())[:1000])
  with pytest.raises(MedjaxIOError) as e:
    nifti.read_nifti(path)
  assert e.value.path == str(path)


def test_real_files_load_with_their_geometry(data_root):
  cases = sorted(glob.glob(os.path.join(data_root, "msd_task04_hippocampus/imagesTr/*.nii.gz")))
  if not cases:
    pytest.skip("MSD Hippocampus is missing")
  dtypes = set()
  for image_path in cases[:40]:
    image = nifti.read_nifti(image_path, modality="MR")
    labels = nifti.read_nifti_labels(image_path.replace("imagesTr", "labelsTr"), num_classes=3)
    dtypes.add(str(image.metadata["source_dtype"]))
    assert image.orientation == "RAS" and image.shape == labels.shape
    np.testing.assert_allclose(image.spacing, 1.0, atol=1e-3)
    np.testing.assert_allclose(image.affine, labels.affine, atol=1e-4)
  assert dtypes == {"uint8", "float32"}  # the real set mixes both
  path = os.path.join(data_root, "nifti/totalsegmentator_examples/example_mr_sm.nii.gz")
  mr, raw = nifti.read_nifti(path), nib.load(path)
  assert "".join(nib.aff2axcodes(raw.affine)) != "RAS" and mr.orientation == "RAS"
  assert sorted(mr.shape) == sorted(raw.shape[:3])
