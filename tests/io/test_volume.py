"""Volume: affine ⇄ spacing/origin/direction, canonical reorientation keeps every voxel in place."""

import numpy as np
import pytest

from medjax.io.volume import Volume


def _rotation(seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  return q


def test_affine_round_trip():
  direction = _rotation(0)
  volume = Volume(np.zeros((4, 5, 6, 1)), (0.5, 1.0, 2.5), (10.0, -3.0, 7.0), direction)
  again = Volume.from_affine(volume.array, volume.affine)
  np.testing.assert_allclose(again.spacing, volume.spacing)
  np.testing.assert_allclose(again.origin, volume.origin)
  np.testing.assert_allclose(again.direction, direction, atol=1e-12)
  index = np.array([[1, 2, 3], [3, 4, 5]])
  np.testing.assert_allclose(volume.world_to_voxel(volume.voxel_to_world(index)), index)


@pytest.mark.parametrize("flips,perm", [((-1, 1, 1), (0, 1, 2)), ((-1, -1, 1), (1, 0, 2)),
                                        ((1, -1, -1), (2, 0, 1))])
def test_canonical_moves_voxels_without_moving_the_world(flips, perm):
  rng = np.random.default_rng(1)
  array = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
  direction = np.eye(3)[:, perm] * np.array(flips)
  volume = Volume(array, (1.0, 2.0, 3.0), (5.0, 6.0, 7.0), direction)
  canonical = volume.to_canonical()
  assert canonical.orientation == "RAS"
  np.testing.assert_allclose(canonical.direction, np.eye(3), atol=1e-12)
  # Every voxel keeps its value at its world position.
  for index in np.ndindex(volume.shape):
    world = volume.voxel_to_world(np.array(index))
    other = tuple(np.round(canonical.world_to_voxel(world)).astype(int))
    np.testing.assert_array_equal(canonical.array[other], volume.array[index])


def test_bad_geometry_is_refused():
  with pytest.raises(ValueError, match="spacing"):
    Volume(np.zeros((2, 2, 2, 1)), (1, 0, 1), (0, 0, 0), np.eye(3))
  with pytest.raises(ValueError, match="singular"):
    Volume(np.zeros((2, 2, 2, 1)), (1, 1, 1), (0, 0, 0), np.zeros((3, 3)))
  with pytest.raises(ValueError, match=r"\[i, j, k, C\]"):
    Volume(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), np.eye(3))


def test_reoriented_goes_back_to_the_input_orientation():
  rng = np.random.default_rng(2)
  lps = np.diag([-1.0, -2.0, 3.0, 1.0])
  volume = Volume.from_affine(rng.normal(size=(3, 4, 5, 1)), lps)
  back = volume.to_canonical().reoriented(lps)
  np.testing.assert_allclose(back.affine, volume.affine)
  np.testing.assert_array_equal(back.array, volume.array)
