"""Flip test-time augmentation: which flips run, and the average they give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.infer import tta


def test_every_subset_of_the_axes_as_batch_axes_plain_first():
  assert tta.flip_sets((), 2) == [()]
  assert tta.flip_sets((1,), 2) == [(), (2,)]
  assert tta.flip_sets((2, 0, 2), 3) == [(), (1,), (3,), (1, 3)]


@pytest.mark.parametrize("axes", [(2,), (-1,)])
def test_an_axis_outside_the_spatial_ones_is_refused(axes):
  with pytest.raises(ValueError, match="spatial axes in \\[0, 2\\)"):
    tta.flip_sets(axes, 2)


def test_the_average_over_flips_of_a_position_sensitive_prediction():
  images = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5, 1))
  weights = jnp.arange(20.0).reshape(1, 4, 5, 1)  # not symmetric: flips change the output
  calls = []

  def predict(x):
    calls.append(1)
    return jnp.sum(x * weights, axis=(1, 2, 3))

  got = tta.flip_averaged(predict, images, (0, 1))
  expected = np.mean([predict(images[:, ::a, ::b]) for a in (1, -1) for b in (1, -1)], axis=0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert not np.allclose(got, predict(images), rtol=1e-3)
  calls.clear()
  plain = predict(images)
  np.testing.assert_allclose(tta.flip_averaged(predict, images, (0, 1), plain=plain), expected,
                             rtol=1e-5)
  assert len(calls) == 4  # the plain prediction given is not recomputed
