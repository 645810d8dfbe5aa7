"""nnU-Net's separate-z resampling of anisotropic volumes: the rule, the orders per axis, and the
round trip back to the original grid."""

import nibabel as nib
import numpy as np
import pytest
from conftest import write_msd
from scipy import ndimage

from medjax.data import transforms
from medjax.data.spatial import separate_z_axis
from medjax.io import msd
from medjax.io.volume import Volume
from medjax.planning import fingerprint, make_plan, preprocess, restore_geometry


def test_the_rule_is_nnunets():
  assert separate_z_axis((1.0, 1.0, 4.0), (1.0, 1.0, 1.0), 3.0) == 2  # the case's coarse axis
  assert separate_z_axis((1.0, 1.0, 3.0), (1.0, 1.0, 1.0), 3.0) is None  # 3× is not > 3×
  assert separate_z_axis((1.0, 1.0, 1.0), (4.0, 1.0, 1.0), 3.0) == 0  # else the target's
  assert separate_z_axis((4.0, 4.0, 1.0), (1.0, 1.0, 1.0), 3.0) is None  # no single coarse axis
  assert separate_z_axis((5.0, 1.0, 1.0), (1.0, 1.0, 5.0), 3.0) == 0  # the case's comes first


def _reference(x, step, shape, order, order_z):
  """Explicit two-pass resampling: output (i, j, k) samples input (i·s0, j·s1, k·s2), in-plane
  with ``order`` slice by slice, then through-plane with ``order_z`` (0: the nearest slice)."""
  ii, jj = np.meshgrid(np.arange(shape[0]) * step[0], np.arange(shape[1]) * step[1],
                       indexing="ij")
  planes = np.stack([ndimage.map_coordinates(x[:, :, k], [ii, jj], order=order, mode="nearest")
                     for k in range(x.shape[2])], -1)
  assert order_z == 0
  nearest = np.minimum(np.floor(np.arange(shape[2]) * step[2] + 0.5).astype(int), x.shape[2] - 1)
  return planes[:, :, nearest]


def test_in_plane_cubic_through_plane_nearest_for_images_and_labels():
  rng = np.random.default_rng(0)
  image = ndimage.gaussian_filter(rng.normal(size=(20, 18, 6)), 1.5).astype(np.float32)
  label = (image > 0).astype(np.uint8) + (image > 0.1)
  spacing, target = np.array([1.0, 1.0, 4.0]), (0.8, 0.8, 1.6)
  assert separate_z_axis(spacing, target, 3.0) == 2
  out = transforms.Resample(spacing=target, order=3, label_order=1, z_axis=2, order_z=0).map(
      {"image": image[..., None], "label": label[..., None], "spacing": spacing})
  shape = out["image"].shape[:3]
  assert shape == (25, 22, 15)
  step = np.array(image.shape) / np.array(shape)
  expected = _reference(image, step, shape, 3, 0)
  np.testing.assert_allclose(out["image"][..., 0], expected, atol=1e-5)
  # Every output slice is one input slice's in-plane resampling: no blend along z.
  assert not np.allclose(expected, _reference(image, step, shape, 1, 0), atol=1e-3)  # cubic
  isotropic = transforms.Resample(spacing=target, order=3).map(
      {"image": image[..., None], "spacing": spacing})["image"][..., 0]
  assert np.abs(isotropic - expected).max() > 1e-2  # one 3-D spline would blend slices
  # Labels: each class's indicator linear in-plane, the strongest class kept; nearest along z.
  scores = np.stack([_reference((label == k).astype(np.float32), step, shape, 1, 0)
                     for k in range(3)])
  np.testing.assert_array_equal(out["label"][..., 0], np.argmax(scores, 0))


def test_an_anisotropic_case_is_planned_preprocessed_and_restored_to_its_grid(tmp_path):
  root = write_msd(str(tmp_path / "msd"), n=2, shape=(30, 28, 8), spacing=(0.8, 0.8, 4.0),
                   lps=True)
  dataset = msd.read_msd_dataset(root)
  plan = make_plan(fingerprint(dataset))
  assert plan["separate_z_anisotropy"] == 3.0
  np.testing.assert_allclose(plan["target_spacing"], [0.8, 0.8, 4.0], rtol=1e-6)
  # A target that resamples every axis: in-plane down, through-plane up.
  plan = make_plan(fingerprint(dataset), overrides={"target_spacing": [1.0, 1.0, 2.5]})
  image, label = msd.load_msd_case(dataset, dataset.cases[0])
  array, seg, props = preprocess(image, label, plan)
  assert props["separate_z_axis"] == 2 and array.shape[:3] == seg.shape[:3]
  assert array.shape[2] > image.shape[2] and array.shape[0] < image.shape[0]
  # The network's output on the preprocessed grid, here the preprocessed label as probabilities.
  probs = np.eye(3, dtype=np.float32)[seg[..., 0]]
  restored = restore_geometry(probs, props)
  assert restored.shape == image.shape + (3,)
  back = Volume.from_affine(restored, image.affine).reoriented(
      nib.load(dataset.cases[0].images[0]).affine)
  source = nib.load(dataset.cases[0].label)
  assert back.shape == source.shape
  np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)
  labels = np.argmax(back.array, -1)
  truth = np.asarray(source.dataobj)
  for k in (1, 2):
    dice = 2 * np.sum((labels == k) & (truth == k)) / (np.sum(labels == k) + np.sum(truth == k))
    assert dice > 0.85, (k, dice)
  # Plans made before the rule (no separate_z_anisotropy) resample as they always did.
  old = {k: v for k, v in plan.items() if k != "separate_z_anisotropy"}
  assert preprocess(image, label, old)[2]["separate_z_axis"] is None
  with pytest.raises(AssertionError):
    np.testing.assert_array_equal(preprocess(image, label, old)[0], array)
