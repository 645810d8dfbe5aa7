"""Model-level modality fusion (`medjax.models.fusion`): early, late and gated U-Nets and ResNets,
gradients into every modality's encoder, gates, and modality dropout."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medjax import models, registry  # noqa: F401  (models: registers the zoo)
from medjax.models import fusion
from medjax.models.unet import UNet

FEATURES = (4, 8)
SHAPE = (2, 8, 8, 2)  # two modalities, 2-D: compiles fast


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")  # compiles far faster than threefry on XLA:CPU


def _unet(fusion_mode):
  return UNet(num_classes=2, features=FEATURES, fusion=fusion_mode)


def _resnet(fusion_mode):
  return registry.lookup("models.resnet_tiny")(num_classes=3, fusion=fusion_mode)


def _paths(tree):
  return {"/".join(k) for k in flax.traverse_util.flatten_dict(tree)}


def _images(seed=0, shape=SHAPE):
  return jax.random.normal(_key(seed), shape)


@pytest.mark.parametrize("mode", fusion.FUSIONS)
@pytest.mark.parametrize("shape", [(2, 8, 8, 2), (1, 8, 8, 8, 3)])
def test_unet_shapes_and_one_encoder_per_modality(mode, shape):
  model = _unet(mode)
  variables = jax.eval_shape(model.init, _key(), jnp.zeros(shape))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
  assert out.shape == shape[:-1] + (2,)
  top = set(variables["params"])
  m = shape[-1]
  if mode == "early":
    assert not any(k.startswith(("modality", "fuse")) for k in top)
  else:
    assert {f"modality{i}" for i in range(m)} <= top and f"modality{m}" not in top
    assert {"fuse0", "fuse1"} <= top and not any(k.startswith("enc") for k in top)
    for i in range(m):  # each modality's encoder reads one channel
      assert variables["params"][f"modality{i}"]["enc0_0"]["Conv_0"]["kernel"].shape[-2] == 1
    fuse = variables["params"]["fuse1"]
    assert fuse["proj"]["kernel"].shape[-2:] == (m * FEATURES[1], FEATURES[1])
    assert ("gate" in fuse) == (mode == "gated")
    if mode == "gated":
      assert fuse["gate"]["kernel"].shape[-1] == m  # one gate per modality


def test_early_fusion_keeps_the_unet_parameter_paths():
  """Existing checkpoints load by these paths: early fusion must not move them."""
  variables = jax.eval_shape(_unet("early").init, _key(), jnp.zeros(SHAPE))
  expected = {f"{b}/Conv_0/kernel" for b in ("enc0_0", "enc0_1", "enc1_0", "enc1_1", "dec0_0",
                                             "dec0_1")}
  expected |= {p.replace("Conv_0/kernel", f"InstanceNorm_0/{w}") for p in expected
               for w in ("scale", "bias")}
  expected |= {"up0/kernel", "up0/bias", "head0/kernel", "head0/bias"}
  assert _paths(variables["params"]) == expected
  default = jax.eval_shape(UNet(num_classes=2, features=FEATURES).init, _key(), jnp.zeros(SHAPE))
  assert jax.tree.map(lambda a: a.shape, default) == jax.tree.map(lambda a: a.shape, variables)


@pytest.mark.parametrize("mode", fusion.FUSIONS)
@pytest.mark.parametrize("build", [_unet, _resnet], ids=["unet", "resnet"])
def test_gradient_reaches_every_modality(mode, build):
  model = build(mode)
  x = _images()
  variables = jax.jit(model.init)(_key(), x)

  @jax.jit
  def grads(params):
    def loss(p):
      out = model.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]
      return jnp.sum(out**2)
    return jax.grad(loss)(params)

  g = grads(variables["params"])
  norm = lambda tree: float(sum(jnp.sum(a**2) for a in jax.tree.leaves(tree)))  # noqa: E731
  if mode == "early":  # both input channels reach the first conv's gradient
    first = g["enc0_0"]["Conv_0"]["kernel"] if build is _unet else g["ConvNormAct_0"]["Conv_0"][
        "kernel"]
    assert all(float(jnp.sum(first[..., c, :] ** 2)) > 0 for c in range(x.shape[-1]))
  else:
    assert all(norm(g[f"modality{m}"]) > 0 for m in range(x.shape[-1]))


@pytest.mark.parametrize("build", [_unet, _resnet], ids=["unet", "resnet"])
def test_gated_model_runs_with_a_modality_zeroed_and_its_gates_respond(build):
  model = build("gated")
  x = _images()
  variables = jax.jit(model.init)(_key(), x)
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates", "batch_stats"]))

  def gates(x):
    out, state = apply(variables, x)
    assert bool(jnp.all(jnp.isfinite(out)))
    found = flax.traverse_util.flatten_dict(state["intermediates"])
    return {k: v[0] for k, v in found.items() if k[-1] == "gates"}

  full, missing = gates(x), gates(x.at[..., 1].set(0.0))
  assert full and set(full) == set(missing)
  for k in full:
    assert full[k].shape[-1] == 2 and bool(jnp.all((full[k] >= 0) & (full[k] <= 1)))
    assert float(jnp.max(jnp.abs(full[k] - missing[k]))) > 1e-4, k


def test_unknown_fusion_is_refused():
  with pytest.raises(ValueError, match="fusion must be one of"):
    jax.eval_shape(_unet("mid").init, _key(), jnp.zeros(SHAPE))
  with pytest.raises(ValueError, match="fusion must be one of"):
    jax.eval_shape(_resnet("mid").init, _key(), jnp.zeros(SHAPE))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), modalities=st.sampled_from([1, 2, 3]),
       rate=st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_modality_dropout_never_drops_every_modality(seed, modalities, rate):
  # A fixed batch size: each (batch, modalities) shape compiles the sampler once.
  keep = np.asarray(fusion.modality_dropout_keep(_key(seed), 8, modalities, rate))
  assert keep.shape == (8, modalities)
  dropped = modalities - keep.sum(axis=1)
  assert np.all(keep.sum(axis=1) >= 1)  # never all
  assert np.all(dropped <= (1 if modalities > 1 and rate > 0 else 0))
  if rate == 1.0 and modalities > 1:
    assert np.all(dropped == 1)


def test_modality_dropout_zeroes_whole_channels():
  x = jnp.ones((64, 3, 3, 2))
  y = np.asarray(fusion.modality_dropout(_key(1), x, 0.5))
  per_channel = y.reshape(64, -1, 2)
  assert np.all((per_channel == 0).all(1) | (per_channel == 1).all(1))  # whole channels only
  dropped = (per_channel == 0).all(1).sum(1)
  assert set(dropped.tolist()) == {0, 1}  # p = 0.5 over 64 samples: both happen
  with pytest.raises(ValueError, match="rate"):
    fusion.modality_dropout_keep(_key(), 2, 2, 1.5)
