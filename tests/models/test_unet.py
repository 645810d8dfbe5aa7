import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import registry
from medjax.models import unet
from medjax.models.unet import UNet, UpTranspose
from medjax.train import losses

FEATURES = (4, 8, 16)


def _key(seed=0):
  # XLA:CPU compiles threefry slowly (~10 s for a U-Net's init); RBG keys compile in ~1 s.
  return jax.random.key(seed, impl="rbg")


def _init(model, shape):
  return jax.jit(model.init)(_key(), jnp.zeros(shape))


def _shapes(model, shape, **kw):
  """Output shapes without compiling."""
  variables = jax.eval_shape(model.init, _key(), jnp.zeros(shape))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), **kw), variables)
  return variables, jax.tree.map(lambda a: a.shape, out)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("shape", [(2, 16, 16, 1), (1, 16, 16, 16, 2)])
def test_output_shapes_2d_and_3d(shape):
  model = registry.lookup("models.unet")(num_classes=3, features=FEATURES)
  variables, out = _shapes(model, shape)
  assert out == shape[:-1] + (3,)
  nd = len(shape) - 2
  assert variables["params"]["enc0_0"]["Conv_0"]["kernel"].shape == (3,) * nd + (shape[-1], 4)
  assert variables["params"]["up1"]["kernel"].shape == (2,) * nd + (16, 8)


@pytest.mark.parametrize("shape,sizes", [
    ((2, 16, 16, 1), [(16, 16), (8, 8), (4, 4)]),
    ((1, 16, 16, 16, 1), [(16, 16, 16), (8, 8, 8), (4, 4, 4)])])
def test_deep_supervision_output_sizes(shape, sizes):
  model = UNet(num_classes=2, features=(4, 8, 16, 32), deep_supervision=True)
  _, out = _shapes(model, shape)
  assert out == [(shape[0], *s, 2) for s in sizes]


def test_anisotropic_strides():
  model = UNet(num_classes=2, features=FEATURES, strides=(1, (1, 2, 2), (2, 2, 2)),
               deep_supervision=True)
  variables, out = _shapes(model, (1, 4, 16, 16, 1))
  assert out == [(1, 4, 16, 16, 2), (1, 4, 8, 8, 2)]
  assert variables["params"]["up0"]["kernel"].shape == (1, 2, 2, 8, 4)
  assert variables["params"]["up1"]["kernel"].shape == (2, 2, 2, 16, 8)


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_non_divisible_sizes_are_cropped_to_the_input(upsample):
  model = UNet(num_classes=3, features=FEATURES, upsample=upsample, deep_supervision=True)
  shape = (1, 15, 17, 1)
  _, out = _shapes(model, shape)
  # Each stride-2 stage keeps ceil(n / 2) voxels; the decoder crops back to the skip's size.
  assert out == [(1, 15, 17, 3), (1, 8, 9, 3)]
  labels = jnp.zeros((1, 15, 17), jnp.int32)
  logits = [jnp.zeros(s) for s in out]
  loss = losses.deep_supervision_loss(logits, labels, lambda o, y: losses.cross_entropy(o, y))
  assert jnp.isfinite(loss)


@pytest.mark.parametrize("norm,upsample", [
    ("instance", "transpose"), ("group", "resize"), ("batch", "transpose")])
def test_norms_and_upsampling_run_under_jit(norm, upsample):
  model = UNet(num_classes=2, features=FEATURES, norm=norm, norm_groups=2, upsample=upsample)
  shape = (2, 16, 16, 1)
  variables = _init(model, shape)
  params = variables["params"]
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  out, updates = train_apply(variables, x)
  assert out.shape == (2, 16, 16, 2) and out.dtype == jnp.float32
  assert jnp.all(jnp.isfinite(out))
  norm_layer = {"instance": "InstanceNorm_0", "group": "GroupNorm_0", "batch": "BatchNorm_0"}
  assert norm_layer[norm] in params["enc0_0"]
  if norm == "batch":
    before, after = variables["batch_stats"], updates["batch_stats"]
    assert any(not jnp.allclose(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after)))
  else:
    assert "batch_stats" not in variables and not updates
  if upsample == "resize":
    assert params["up0"]["kernel"].shape == (1, 1, 8, 4)


@pytest.mark.parametrize("x_shape,strides", [((2, 3, 4, 5), (2, 2)),
                                             ((1, 2, 3, 2, 5), (1, 2, 3))])
def test_up_transpose_equals_flax_conv_transpose(x_shape, strides):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  ours = UpTranspose(6, strides)
  params = ours.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
  ref = nn.ConvTranspose(6, strides, strides, padding="VALID")
  nd = len(strides)
  # Same layout; flax's ConvTranspose flips the kernel (PyTorch's, ours, does not).
  flipped = {"params": {"kernel": params["params"]["kernel"][(slice(None, None, -1),) * nd],
                        "bias": params["params"]["bias"]}}
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(flipped, x), rtol=1e-5, atol=1e-5)


def _expected_params(features, c_in, classes, nd, convs=2, heads=1):
  """Parameters of the encoder convs + norm scale/bias, the transposed convs and the heads."""
  k, total, c = 3**nd, 0, c_in
  for f in features:
    for _ in range(convs):
      total, c = total + k * c * f + 2 * f, f
  for f in reversed(features[:-1]):
    total += 2**nd * c * f + f
    c = 2 * f
    for _ in range(convs):
      total, c = total + k * c * f + 2 * f, f
  return total + sum(f * classes + classes for f in features[:heads])


def test_parameter_counts():
  model = UNet(num_classes=2, features=(4, 8))
  params = jax.eval_shape(model.init, _key(), jnp.zeros((1, 16, 16, 1)))["params"]
  # By hand: encoder 36+8 + 144+8 + 288+16 + 576+16, up 128+4, decoder 288+8 + 144+8, head 8+2.
  assert _count(params) == 1682 == _expected_params((4, 8), 1, 2, 2)
  big = UNet(num_classes=3, features=(32, 64, 128, 256, 320), deep_supervision=True)
  params = jax.eval_shape(big.init, _key(), jnp.zeros((1, 32, 32, 32, 1)))["params"]
  assert _count(params) == _expected_params((32, 64, 128, 256, 320), 1, 3, 3, heads=4)


def test_instance_norm_keeps_flax_instance_norm_parameter_paths():
  """Checkpoints written when the blocks held flax's InstanceNorm still load: same tree."""
  block = unet.ConvBlock(features=16)
  params = jax.eval_shape(block.init, _key(), jnp.zeros((1, 8, 8, 8, 4)), False)["params"]
  flax_norm = jax.eval_shape(nn.InstanceNorm().init, _key(), jnp.zeros((1, 8, 8, 8, 16)))
  assert jax.tree.structure(params["InstanceNorm_0"]) == jax.tree.structure(flax_norm["params"])
  assert {k: v.shape for k, v in params["InstanceNorm_0"].items()} == {
      k: v.shape for k, v in flax_norm["params"].items()}


def test_deep_supervision_shares_parameters_with_the_plain_model():
  shape = (1, 16, 16, 1)
  ds = UNet(num_classes=2, features=FEATURES, deep_supervision=True)
  plain = UNet(num_classes=2, features=FEATURES)
  variables = _init(ds, shape)
  plain_shapes = jax.eval_shape(plain.init, _key(), jnp.zeros(shape))
  assert set(plain_shapes["params"]) == set(variables["params"]) - {"head1"}
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  outs = jax.jit(ds.apply)(variables, x)
  plain_vars = {"params": {k: v for k, v in variables["params"].items() if k != "head1"}}
  np.testing.assert_allclose(jax.jit(plain.apply)(plain_vars, x), outs[0], rtol=1e-6)


@pytest.mark.parametrize("kwargs,shape,match", [
    (dict(strides=(1, 2)), (1, 16, 16, 1), "2 entries for 3 stages"),
    (dict(strides=(2, 2, 2)), (1, 16, 16, 1), "first stage"),
    (dict(strides=(1, (1, 2, 2), 2)), (1, 16, 16, 1), "does not fit a 2-D"),
    (dict(norm="layer"), (1, 16, 16, 1), "norm must be"),
    (dict(upsample="pixelshuffle"), (1, 16, 16, 1), "upsample must be"),
    (dict(), (16, 16, 1), "expects"),
    (dict(features=(8,)), (1, 16, 16, 1), "at least 2 stages")])
def test_configuration_errors(kwargs, shape, match):
  model = UNet(num_classes=2, **{"features": FEATURES, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, _key(), jnp.zeros(shape))


def test_overfits_one_image():
  """Adam on one noisy 2-D image: a square's mask is learned to Dice > 0.9 in 40 steps."""
  size = 24
  label = np.zeros((1, size, size), np.int32)
  label[0, 6:15, 9:19] = 1
  noise = np.random.default_rng(0).normal(0.0, 0.3, label.shape)
  image = jnp.asarray((label + noise)[..., None], jnp.float32)
  labels = jnp.asarray(label)
  model = UNet(num_classes=2, features=(8, 16), deep_supervision=True)
  params = _init(model, image.shape)["params"]
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  loss_fn = lambda o, y: losses.dice_ce_loss(o, y, 2)

  @jax.jit
  def step(params, opt_state):
    loss_of = lambda p: losses.deep_supervision_loss(
        model.apply({"params": p}, image, train=True), labels, loss_fn)
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
  pred = jnp.argmax(model.apply({"params": params}, image)[0], -1)
  dice = 2 * jnp.sum(pred * labels) / (jnp.sum(pred) + jnp.sum(labels))
  assert dice > 0.9, (dice, loss)
