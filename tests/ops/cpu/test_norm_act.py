"""Tests of medjax/ops/cpu/norm_act.py: the fused instance norm + leaky ReLU equals flax's pair."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import ops
from medjax.ops import xla
from medjax.ops.cpu import norm_act, onednn
from tests.ops.cpu.test_onednn import needs_onednn


def _fused_or_skip(x):
  if not norm_act.fused_applies(x):
    pytest.skip("the fused handlers do not run here (no oneDNN build or no AVX2 + FMA)")


def _operands(shape, mean=1.0, std=3.0, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * std + mean).astype(np.float32)
  scale = (rng.random(shape[-1]) + 0.5).astype(np.float32)
  bias = (rng.standard_normal(shape[-1]) * 0.5).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)


def _value_and_grads(f, x, scale, bias):
  """f's value and the gradients of a nonlinear loss of it (cos: every element matters)."""
  return jax.jit(lambda x, s, b: (f(x, s, b), jax.grad(
      lambda *a: jnp.sum(jnp.cos(f(*a))), argnums=(0, 1, 2))(x, s, b)))(x, scale, bias)


def test_reference_equals_flax_instance_norm_then_leaky_relu():
  x, scale, bias = _operands((2, 6, 7, 5, 3))
  module = nn.InstanceNorm(epsilon=1e-5)
  params = {"params": {"scale": scale, "bias": bias}}
  expected = nn.leaky_relu(module.apply(params, x), 0.01)
  np.testing.assert_allclose(xla.instance_norm_leaky_relu(x, scale, bias, 1e-5, 0.01), expected,
                             rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("shape,mean,std", [
    ((2, 6, 10, 7, 16), 1.0, 3.0),      # 3-D, two vectors of channels
    ((3, 9, 11, 24), 0.0, 1.0),         # 2-D, three
    ((1, 5, 6, 4, 8), 100.0, 1.0),      # a mean far from 0 against the spread
    ((2, 1, 1, 1, 8), 0.0, 1.0)])       # one voxel: variance 0
def test_fused_equals_reference_values_and_gradients(shape, mean, std):
  x, scale, bias = _operands(shape, mean, std)
  _fused_or_skip(x)
  ours = _value_and_grads(norm_act.instance_norm_leaky_relu, x, scale, bias)
  # The norm ignores a constant added to x, value and gradients alike. Taken off for the
  # reference, whose E[x²] − E[x]² in float32 loses digits at mean 100 (ours sums in double).
  shift = np.asarray(x).mean(axis=tuple(range(1, x.ndim - 1)), keepdims=True)
  ref = _value_and_grads(lambda x, *a: xla.instance_norm_leaky_relu(x - shift, *a, 1e-5, 0.01), x, scale,
                         bias)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max())))


@needs_onednn
def test_fused_does_not_depend_on_the_threads(monkeypatch):
  """Runs of voxels are taken as threads come free; the sums must follow neither them nor their
  number, to the last bit."""
  x, scale, bias = _operands((2, 10, 12, 9, 16))
  _fused_or_skip(x)
  dy = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  results = []
  for threads in (1, 2, 3, 2):
    monkeypatch.setattr(onednn, "threads_per_call", lambda threads=threads: threads)
    y, mean, rstd = norm_act._forward_call(x, scale, bias, 1e-5, 0.01)
    results.append([np.asarray(a) for a in (
        y, mean, rstd, *norm_act._backward_call(x, scale, bias, mean, rstd, dy, 0.01))])
  for other in results[1:]:
    for a, b in zip(other, results[0]):
      np.testing.assert_array_equal(a, b)


def _custom_calls(f, *args):
  # A new function each time: jit's trace cache does not know `portable()`.
  return [line for line in jax.jit(lambda *a: f(*a)).lower(*args).as_text().splitlines()
          if "instance_norm_leaky_relu" in line and "custom_call" in line]


@needs_onednn
def test_reference_runs_where_the_fused_handlers_do_not():
  x, scale, bias = _operands((2, 6, 6, 6, 16))
  _fused_or_skip(x)
  assert _custom_calls(ops.instance_norm_leaky_relu, x, scale, bias)
  with ops.portable():  # exported modules stay XLA-only
    assert not _custom_calls(ops.instance_norm_leaky_relu, x, scale, bias)
  narrow, s4, b4 = _operands((2, 6, 6, 6, 4))  # 4 channels: not a whole AVX2 vector
  assert not norm_act.fused_applies(narrow)
  np.testing.assert_allclose(norm_act.instance_norm_leaky_relu(narrow, s4, b4),
                             xla.instance_norm_leaky_relu(narrow, s4, b4, 1e-5, 0.01), rtol=1e-6)


@needs_onednn
def test_a_batch_split_over_devices_stays_split():
  """Over conftest's 4 devices each call normalises its own samples (no all-gather); the scale
  and bias gradients, summed across devices, equal the reference's."""
  from medjax.train import sharding

  x, scale, bias = _operands((8, 6, 5, 4, 16))
  _fused_or_skip(x)
  mesh = sharding.make_mesh()
  split, replicated = sharding.batch_sharded(mesh), sharding.replicated(mesh)
  x = jax.device_put(x, split)
  scale, bias = jax.device_put(scale, replicated), jax.device_put(bias, replicated)
  loss = lambda f: lambda *a: jnp.sum(jnp.cos(f(*a)))  # noqa: E731
  ours = jax.jit(jax.value_and_grad(loss(norm_act.instance_norm_leaky_relu), argnums=(0, 1, 2)),
                 out_shardings=(replicated, (split, replicated, replicated)))
  hlo = ours.lower(x, scale, bias).compile().as_text()
  calls = [line for line in hlo.splitlines()
           if "custom-call(" in line and "instance_norm_leaky_relu" in line]
  assert len(calls) == 2 and "all-gather" not in hlo
  assert all("f32[2,6,5,4,16]" in line for line in calls), calls
  value, grads = ours(x, scale, bias)
  ref_value, ref_grads = jax.value_and_grad(
      loss(lambda *a: xla.instance_norm_leaky_relu(*a, 1e-5, 0.01)), argnums=(0, 1, 2))(
          np.asarray(x), np.asarray(scale), np.asarray(bias))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_vmapped_equals_looped():
  xs, scale, bias = _operands((3, 2, 5, 6, 8))
  _fused_or_skip(xs[0])
  f = lambda x: norm_act.instance_norm_leaky_relu(x, scale, bias)  # noqa: E731
  np.testing.assert_allclose(jax.vmap(f)(xs), np.stack([f(x) for x in xs]), rtol=1e-6)
  grads = jax.vmap(jax.grad(lambda x: jnp.sum(jnp.cos(f(x)))))(xs)
  np.testing.assert_allclose(grads, np.stack([jax.grad(lambda x: jnp.sum(jnp.cos(f(x))))(x)
                                              for x in xs]), rtol=1e-5, atol=1e-6)
