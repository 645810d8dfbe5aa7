"""Fusion metrics against values derived independently: hand cases, scikit-image, scikit-learn."""

import numpy as np
import pytest
from PIL import Image
from skimage.measure import shannon_entropy
from skimage.metrics import structural_similarity
from sklearn.metrics import mutual_info_score

from medjax.metrics import fusion as fm

RNG = np.random.default_rng(0)


def _image(shape=(48, 56), seed=0):
  """A smooth random 8-bit image (not white noise: SSIM and VIF need structure)."""
  rng = np.random.default_rng(seed)
  coarse = rng.random((shape[0] // 8 + 2, shape[1] // 8 + 2))
  smooth = np.kron(coarse, np.ones((8, 8)))[: shape[0], : shape[1]]
  return np.round(np.clip(200 * smooth + rng.normal(0, 8, shape), 0, 255))


def _step(size=32, height=100.0):
  image = np.zeros((size, size))
  image[:, size // 2:] = height
  return image


def test_a_constant_image_has_no_entropy_contrast_or_frequency():
  flat = np.full((20, 30), 77.0)
  assert (fm.entropy(flat), fm.standard_deviation(flat), fm.spatial_frequency(flat)) == (0, 0, 0)


def test_entropy_of_known_histograms_and_as_scikit_image_counts():
  assert fm.entropy(np.array([[0.0, 255.0]] * 4)) == pytest.approx(1.0)
  assert fm.entropy(np.array([[0.0, 1.0, 2.0, 3.0]] * 5)) == pytest.approx(2.0)
  image = RNG.integers(0, 256, (40, 40)).astype(np.uint8)
  assert fm.entropy(image) == pytest.approx(shannon_entropy(image, base=2))


def test_standard_deviation_and_spatial_frequency_by_hand():
  columns = np.tile([0.0, 90.0], (6, 5))  # alternate columns: every row step 90, no column step
  assert fm.spatial_frequency(columns) == pytest.approx(90.0)
  assert fm.spatial_frequency(columns.T) == pytest.approx(90.0)
  assert fm.standard_deviation(columns) == pytest.approx(45.0)
  image = _image()
  assert fm.standard_deviation(image) == pytest.approx(np.std(image))


def test_mutual_information_is_scikit_learns_summed_over_sources_in_nats():
  f, a, b = _image(seed=1), _image(seed=2), _image(seed=3)
  expected = mutual_info_score(f.ravel(), a.ravel()) + mutual_info_score(f.ravel(), b.ravel())
  assert fm.mutual_information(f, a, b) == pytest.approx(expected, rel=1e-10)
  # MI(X, X) = H(X): an image fused with itself scores twice its own entropy (nats).
  assert fm.mutual_information(f, f, f) == pytest.approx(2 * fm.entropy(f) * np.log(2))


def test_scd_of_the_sum_of_the_sources_is_two():
  a, b = _image(seed=4), _image(seed=5)
  assert fm.scd(a + b, a, b) == pytest.approx(2.0)
  assert np.isnan(fm.scd(a, a, b))  # an exact copy of A: F - A = 0 has no correlation at all


def test_vif_of_a_copy_is_one_per_source_and_noise_lowers_it():
  image = _image((64, 64), seed=6)
  assert fm.vif(image, image, image) == pytest.approx(2.0)
  assert fm.vif(image + 20.0, image, image) == pytest.approx(2.0)  # VIF ignores a mean shift
  noisy = image + RNG.normal(0, 25, image.shape)
  assert 0.0 < fm.vif(noisy, image, image) < 1.5


def test_qabf_of_a_copied_step_edge_and_of_a_flat_result():
  # F = A = B: on the edge the strength term saturates (ratio = magnitude ≥ 1, the reference's
  # equal case) and the orientation term is its value at agreement, 0.9879 / (1 + e^(-22 * 0.2)).
  step = _step()
  expected = 0.9994 * 0.9879 / (1.0 + np.exp(-22.0 * 0.2))
  assert fm.qabf(step, step, step) == pytest.approx(expected, rel=1e-6)
  assert fm.qabf(np.zeros_like(step), step, step) < 1e-3  # every edge lost


def test_ssim_is_scikit_images_summed_over_sources():
  f, a, b = _image(seed=7), _image(seed=8), _image(seed=9)
  for data_range in (2.0, 255.0):
    expected = sum(structural_similarity(f, x, data_range=data_range) for x in (a, b))
    assert fm.ssim(f, a, b, data_range=data_range) == pytest.approx(expected, rel=1e-9)
  assert fm.ssim(f, f, f) == pytest.approx(2.0)


def test_all_eight_metrics_and_the_grey_levels_of_colour_images():
  a, b = _image(seed=10), _image(seed=11)
  scores = fm.fusion_metrics((a + b) / 2, a, b)
  assert tuple(scores) == fm.METRICS and all(np.isfinite(list(scores.values())))
  rgb = RNG.integers(0, 256, (8, 8, 3)).astype(np.uint8)
  pillow_l = np.asarray(Image.fromarray(rgb).convert("L"), np.float64)
  np.testing.assert_allclose(fm.grey(rgb), pillow_l, atol=1.0)
  with pytest.raises(ValueError, match="one size"):
    fm.fusion_metrics(a, a[:-1], b)
