"""Tests of medjax/ops/cpu/upsample_fold.py: the folded up-sampling + concat + convolution equals
the sequence it replaces, values and gradients, and is chosen only where it should be."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import ops
from medjax.ops import xla
from medjax.ops.cpu import upsample_fold
from tests.ops.cpu.test_onednn import needs_onednn


def _operands(low, strides, c, f, s, o, k=3, seed=0):
  """x [2, *low, c], up_kernel [*strides, c, f], a non-zero up_bias [f] (its share is the
  border-dependent part of the fold), skip [2, *(low · strides), s], kernel [k…, f + s, o].
  numpy's random numbers: JAX's would compile a program for each."""
  nd = len(low)
  rng = np.random.default_rng(seed)
  size = tuple(n * st for n, st in zip(low, strides))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  operands = (normal(2, *low, c), normal(*strides, c, f) / np.sqrt(c), normal(f) + 0.5,
               normal(2, *size, s), normal(*(k,) * nd, f + s, o) / np.sqrt(k**nd * (f + s)))
  return tuple(a.astype(np.float32) for a in operands)


def _sequence(x, up_kernel, up_bias, skip, kernel):
  """The unfused sequence in XLA's forms: up-sample, crop, concatenate, convolve."""
  up = xla.upsample(x, up_kernel, up_bias)[(slice(None), *map(slice, skip.shape[1:-1]))]
  return xla.conv(jnp.concatenate([up, skip], -1), kernel, (1,) * (x.ndim - 2), "SAME")


def _value_and_grads(f, operands):
  """f's value and the gradients in every operand of a nonlinear loss of it."""
  shape = jax.eval_shape(f, *operands).shape
  weights = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
  loss = lambda *a: jnp.sum(weights * jnp.sin(f(*a)))  # noqa: E731
  return jax.jit(lambda *a: (f(*a), jax.grad(loss, argnums=tuple(range(5)))(*a)))(*operands)


def _assert_close(ours, expected):
  (y, grads), (y_ref, grads_ref) = ours, expected
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(y_ref)))
  for name, g, g_ref in zip(("x", "up_kernel", "up_bias", "skip", "kernel"), grads, grads_ref):
    g_ref = np.asarray(g_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4 * np.max(np.abs(g_ref)),
                               err_msg=name)


def _hlo(operands) -> str:
  """The op's HLO, traced afresh (the module's switches are read at trace time)."""
  return jax.jit(lambda *a: ops.upsample_concat_conv(*a)).lower(*operands).as_text()


@needs_onednn
@pytest.mark.parametrize("low,strides", [
    ((3, 5, 4), (1, 2, 2)),  # odd sizes, a stride-1 axis (nnU-Net's anisotropic plans)
    ((5, 3), (2, 2))])       # 2-D (the 2-D U-Net)
def test_folded_equals_the_sequence_values_and_gradients(low, strides, monkeypatch):
  operands = _operands(low, strides, 6, 4, 3, 5)  # every channel count different
  monkeypatch.setattr(upsample_fold, "FOLD_MIN_BYTES", 0)  # folded, however small
  assert upsample_fold.applies(*operands[:2], *operands[3:])
  assert "medjax_onednn_input_grad" in _hlo(operands)  # the composite kernel's transposed conv
  _assert_close(_value_and_grads(ops.upsample_concat_conv, operands),
                _value_and_grads(_sequence, operands))


@needs_onednn
def test_small_maps_are_built_large_ones_folded(monkeypatch):
  """The threshold both ways: below `FOLD_MIN_BYTES` per image the map is built (no transposed
  convolution), at it the fold runs; both equal the sequence."""
  operands = _operands((2, 3, 2), (2, 2, 2), 4, 8, 3, 5)
  up_bytes = 4 * 6 * 4 * 8 * 4  # one image's up-sampled map, float32
  expected = jax.jit(_sequence)(*operands)
  for threshold, folds in ((up_bytes + 1, False), (up_bytes, True)):
    monkeypatch.setattr(upsample_fold, "FOLD_MIN_BYTES", threshold)
    assert upsample_fold.applies(*operands[:2], *operands[3:]) == folds
    assert ("medjax_onednn_input_grad" in _hlo(operands)) == folds
    np.testing.assert_allclose(jax.jit(lambda *a: ops.upsample_concat_conv(*a))(*operands),
                               expected, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_cropped_map_or_an_even_kernel_is_built(monkeypatch):
  """Up-sampled maps past the skip's size (non-divisible inputs) and even kernels are not folded;
  the op still equals the sequence."""
  monkeypatch.setattr(upsample_fold, "FOLD_MIN_BYTES", 0)
  x, up_kernel, up_bias, skip, kernel = _operands((3, 4, 3), (2, 2, 2), 4, 4, 3, 5)
  cropped = (x, up_kernel, up_bias, skip[:, :5, :, :5], kernel)
  even = (x, up_kernel, up_bias, skip, kernel[:2, :2, :2])
  for operands in (cropped, even):
    assert not upsample_fold.applies(*operands[:2], *operands[3:])
    assert "medjax_onednn_input_grad" not in _hlo(operands)
    np.testing.assert_allclose(jax.jit(ops.upsample_concat_conv)(*operands),
                               jax.jit(_sequence)(*operands), rtol=1e-4, atol=1e-4)


def test_portable_and_switched_off_build_the_map(monkeypatch):
  """Inside ``ops.portable()`` (exported modules) and with `FOLD` off (the benchmarks' baseline)
  the sequence runs as written: no transposed convolution, no custom call."""
  monkeypatch.setattr(upsample_fold, "FOLD_MIN_BYTES", 0)
  operands = _operands((2, 3, 2), (2, 2, 2), 4, 4, 3, 5)
  with ops.portable():
    hlo = _hlo(operands)
  assert "custom_call" not in hlo and "lhs_dilation" not in hlo
  monkeypatch.setattr(upsample_fold, "FOLD", False)
  assert not upsample_fold.applies(*operands[:2], *operands[3:])
  assert "medjax_onednn_input_grad" not in _hlo(operands)


@pytest.mark.parametrize("batch", [1, 3])
def test_add_to_every_sample_values_and_gradients(batch):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, 4, 5, 2)).astype(np.float32)
  value = rng.standard_normal((4, 5, 2)).astype(np.float32)
  weights = rng.standard_normal(x.shape).astype(np.float32)  # a cotangent other than ones
  loss = lambda f: lambda x, v: jnp.sum(weights * f(x, v))  # noqa: E731
  ours = jax.jit(jax.value_and_grad(loss(upsample_fold.add_to_every_sample), argnums=(0, 1)))(
      x, value)
  plain = jax.value_and_grad(loss(lambda x, v: x + v[None]), argnums=(0, 1))(x, value)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
