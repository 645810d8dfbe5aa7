import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.layers import Conv, ConvNormAct


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 9, 11, 3), 3, 1, "SAME"), ((2, 9, 11, 3), 3, 2, "SAME"), ((2, 8, 8, 4), 1, 2, "SAME"),
    ((2, 5, 7, 6, 2), 3, 1, "SAME"), ((2, 6, 7, 6, 2), (1, 3, 3), (1, 2, 2), "VALID"),
    ((2, 12, 3), 5, 1, "SAME")])
def test_conv_equals_flax_conv_values_and_gradients(shape, kernel, strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ours = Conv(7, kernel, strides, padding=padding, use_bias=True)
  ref = nn.Conv(7, (kernel,) * (len(shape) - 2) if isinstance(kernel, int) else kernel,
                strides, padding=padding)
  params = ref.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_rejects_4d_spatial():
  with pytest.raises(ValueError, match="rank 4"):
    Conv(2).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 3, 3, 3, 1)))


def test_conv_norm_act_zero_init_scale_gives_zero_output():
  m = ConvNormAct(4, zero_init_scale=True, act=None)
  v = m.init(jax.random.PRNGKey(0), jnp.ones((2, 5, 5, 3)), train=False)
  out, _ = m.apply(v, jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 3)), train=True,
                   mutable=["batch_stats"])
  np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_group_norm_keeps_no_running_statistics_so_eval_equals_train():
  layer = ConvNormAct(16, 3, norm="group")
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = layer.init(jax.random.PRNGKey(1), x, train=False)
  assert "batch_stats" not in variables
  np.testing.assert_allclose(layer.apply(variables, x, train=True),
                             layer.apply(variables, x, train=False), atol=1e-6)
  # Each sample is normalised on its own: one sample's output ignores the rest of the batch.
  np.testing.assert_allclose(layer.apply(variables, x[:1], train=False),
                             layer.apply(variables, x, train=False)[:1], atol=1e-5)
  with pytest.raises(ValueError, match="norm"):
    ConvNormAct(16, norm="instance").init(jax.random.PRNGKey(1), x, train=False)
