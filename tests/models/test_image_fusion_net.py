"""The DenseFuse-style fusion network: shapes, range, a shared encoder, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import registry
from medjax.models.image_fusion import DenseFusion


def test_two_sources_in_one_fused_channel_out_in_0_1():
  model = registry.lookup("dense_fusion", "models.")(num_classes=1, features=4, dense_layers=2,
                                                     decoder=(8, 4))
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 20, 24, 2))
  params = model.init(jax.random.PRNGKey(1), x)
  y = model.apply(params, x, train=True)
  assert y.shape == (3, 20, 24, 1) and y.dtype == jnp.float32
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  # One encoder for both sources (shared weights): 1 input channel, dense block widths 4 -> 8.
  p = params["params"]
  assert p["encoder_in"]["kernel"].shape == (3, 3, 1, 4)
  assert p["dense_1"]["kernel"].shape == (3, 3, 8, 4)
  assert p["fusion"]["kernel"].shape == (3, 3, 2 * 12, 12)
  # Each source reaches the output.
  for s in range(2):
    grad = jax.grad(lambda x: model.apply(params, x).sum())(x)[..., s]
    assert float(jnp.abs(grad).sum()) > 0


def test_it_learns_to_return_the_brighter_source():
  model = DenseFusion(features=4, dense_layers=1, decoder=(8,))
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 12, 12, 2))
  target = jnp.max(x, axis=-1, keepdims=True)
  params = model.init(jax.random.PRNGKey(1), x)
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  loss = lambda p: jnp.mean(jnp.abs(model.apply(p, x) - target))

  @jax.jit
  def step(p, opt):
    value, grads = jax.value_and_grad(loss)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value

  first = float(loss(params))
  for _ in range(60):
    params, opt, _ = step(params, opt)
  assert float(loss(params)) < 0.5 * first
  np.testing.assert_array_less(0.0, first)
