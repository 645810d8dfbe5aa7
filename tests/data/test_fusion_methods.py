"""Classical pixel-level fusion: pyramid and wavelet rules, trivial fusions, colour through Y."""

import numpy as np
import pytest
from PIL import Image

from medjax.data import fusion


def _halves(size=64, seed=0):
  """Two images on one flat base: fine texture in the left half of ``a``, the right of ``b``."""
  rng = np.random.default_rng(seed)
  texture = 60.0 * np.sign(rng.standard_normal((size, size)))
  a, b = np.full((size, size), 100.0), np.full((size, size), 100.0)
  a[:, : size // 2] += texture[:, : size // 2]
  b[:, size // 2:] += texture[:, size // 2:]
  return a, b, 100.0 + texture


def test_the_pyramid_collapses_to_its_image_at_any_size():
  image = np.random.default_rng(0).random((37, 53)) * 255
  pyramid = fusion.laplacian_pyramid(image, 4)
  assert [p.shape for p in pyramid] == [(37, 53), (19, 27), (10, 14), (5, 7), (3, 4)]
  np.testing.assert_allclose(fusion.collapse_pyramid(pyramid), image, atol=1e-9)


@pytest.mark.parametrize("method", list(fusion.METHODS))
def test_an_image_fused_with_itself_is_itself(method):
  image = np.random.default_rng(1).random((40, 48)) * 255
  np.testing.assert_allclose(fusion.fuse(image, image, method), image, atol=1e-6)


def test_mean_and_max_by_hand():
  a, b = np.array([[0.0, 200.0]]), np.array([[100.0, 50.0]])
  np.testing.assert_array_equal(fusion.fuse(a, b, "mean"), [[50.0, 125.0]])
  np.testing.assert_array_equal(fusion.fuse(a, b, "max"), [[100.0, 200.0]])


@pytest.mark.parametrize("method", ["pyramid", "wavelet"])
def test_multiscale_rules_keep_each_sources_detail_at_full_strength(method):
  # Max-abs details take each half's texture from the source that has it; the mean halves it.
  a, b, both = _halves()
  fused = fusion.fuse(a, b, method)
  inner = (slice(8, -8), np.r_[8:24, 40:56])  # away from the borders and the seam
  assert np.corrcoef(fused[inner].ravel(), both[inner].ravel())[0, 1] > 0.97
  assert fused[inner].std() == pytest.approx(both[inner].std(), rel=0.1)
  assert fusion.fuse(a, b, "mean")[inner].std() == pytest.approx(both[inner].std() / 2, rel=0.05)
  assert fused.mean() == pytest.approx(both.mean(), abs=2)  # the base averaged: same level


def test_ycbcr_is_bt601_full_range_as_pillow_computes_it():
  rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3)).astype(np.uint8)
  pillow = np.asarray(Image.fromarray(rgb).convert("YCbCr"), np.float64)
  np.testing.assert_allclose(fusion.rgb_to_ycbcr(rgb), pillow, atol=1.0)
  np.testing.assert_allclose(fusion.ycbcr_to_rgb(fusion.rgb_to_ycbcr(rgb)), rgb, atol=1e-9)


@pytest.mark.parametrize("method", list(fusion.METHODS))
def test_a_colour_source_keeps_its_colour_and_gives_its_luminance(method):
  colour = np.random.default_rng(3).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  grey = fusion.luminance(colour)  # the same luminance: every method returns it unchanged
  fused = fusion.fuse(grey, colour, method)
  assert fused.shape == (32, 32, 3)
  np.testing.assert_allclose(fused, colour, atol=1e-6)
  assert fusion.to_uint8(fused).dtype == np.uint8


def test_fusing_a_colour_image_takes_the_grey_ones_structure_into_y():
  colour = np.zeros((32, 32, 3), np.uint8)
  colour[..., 0] = 200  # flat red
  edge = np.zeros((32, 32))
  edge[:, 16:] = 255
  fused = fusion.fuse(edge, colour, "max")
  y = fusion.rgb_to_ycbcr(fused)[..., 0]
  assert y[:, 20:].mean() > 200 and y[:, :12].mean() == pytest.approx(0.299 * 200, abs=1)


def test_sizes_and_methods_are_checked():
  with pytest.raises(ValueError, match="sizes differ"):
    fusion.fuse(np.zeros((8, 8)), np.zeros((8, 9)))
  with pytest.raises(ValueError, match="unknown fusion method 'nope'"):
    fusion.fuse(np.zeros((8, 8)), np.zeros((8, 8)), "nope")
