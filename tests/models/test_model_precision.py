"""Every registered model honours a bfloat16 compute dtype: its convolutions run in bf16 while its
parameters and its outputs (logits, fused images) stay float32."""

import jax
import jax.numpy as jnp
import pytest

from medjax import models, registry  # noqa: F401  (models: registers the zoo)

# (registry name, small kwargs, input shape): each model family, 2-D and 3-D, and the fusions.
MODELS = [
    ("resnet_tiny", {}, (2, 16, 16, 1)),
    ("resnet_tiny", {}, (2, 8, 8, 8, 1)),
    ("resnet_tiny", {"fusion": "gated"}, (2, 16, 16, 2)),
    ("unet", {"features": (4, 8)}, (2, 8, 8, 1)),
    ("unet", {"features": (4, 8), "deep_supervision": True}, (2, 8, 8, 8, 1)),
    ("unet", {"features": (4, 8), "fusion": "late", "norm": "batch"}, (2, 8, 8, 8, 2)),
    ("slice_lstm", {"encoder": "small_cnn(features=(4, 8))", "hidden": 8}, (2, 6, 8, 8, 1)),
    ("slice_gru", {"encoder": "resnet_tiny", "hidden": 8}, (2, 6, 8, 8, 1)),
    ("resnet18_2p5d", {"width": 8}, (2, 6, 8, 8, 1)),
    ("dense_fusion", {}, (2, 8, 8, 2)),
]


def _convolutions(fn, *args) -> list[str]:
  """The result types of the StableHLO convolutions ``fn`` lowers to."""
  text = jax.jit(fn).lower(*args).as_text()
  return [line.rsplit("->", 1)[-1] for line in text.splitlines() if "stablehlo.convolution" in line]


@pytest.mark.parametrize("name,kwargs,shape", MODELS)
def test_bf16_convolutions_with_float32_parameters_and_outputs(name, kwargs, shape):
  make = registry.lookup(name, "models.")
  model = make(num_classes=3, dtype=jnp.bfloat16, **kwargs)
  x = jnp.linspace(-1.0, 1.0, num=int(jnp.prod(jnp.array(shape)))).reshape(shape)
  variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False),
                             jax.random.key(0, impl="rbg"), x)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

  def train_forward(v, x):
    return model.apply(v, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(1, impl="rbg")})[0]

  outputs = jax.eval_shape(train_forward, variables, x)
  assert {a.dtype for a in jax.tree.leaves(outputs)} == {jnp.dtype(jnp.float32)}
  convs = _convolutions(train_forward, variables, x)
  assert convs and all("bf16" in c for c in convs), convs
  # The float32 model of the same config convolves in float32: the dtype is what changed.
  plain = make(num_classes=3, **kwargs)
  assert all("f32" in c for c in _convolutions(
      lambda v, x: plain.apply(v, x, train=False), variables, x))
