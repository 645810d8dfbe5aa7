"""The DenseFuse-style fusion network: shapes, range, a shared encoder (training: the loop test
tests/train/test_loop_image_fusion.py)."""

import jax
import jax.numpy as jnp

from medjax import registry


def test_two_sources_in_one_fused_channel_out_in_0_1():
  model = registry.lookup("dense_fusion", "models.")(num_classes=1, features=4, dense_layers=2,
                                                     decoder=(8, 4))
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 20, 24, 2))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  # One compiled call (eager flax would compile each op): the output and its input gradient.
  y, grad = jax.jit(lambda p, x: (model.apply(p, x, train=True),
                                  jax.grad(lambda x: model.apply(p, x).sum())(x)))(params, x)
  assert y.shape == (3, 20, 24, 1) and y.dtype == jnp.float32
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  # One encoder for both sources (shared weights): 1 input channel, dense block widths 4 -> 8.
  p = params["params"]
  assert p["encoder_in"]["kernel"].shape == (3, 3, 1, 4)
  assert p["dense_1"]["kernel"].shape == (3, 3, 8, 4)
  assert p["fusion"]["kernel"].shape == (3, 3, 2 * 12, 12)
  # Each source reaches the output.
  assert (jnp.abs(grad).sum(axis=(0, 1, 2)) > 0).all()
