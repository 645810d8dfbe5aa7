"""Tests of medjax/ops/cpu/conv.py: its XLA:CPU lowerings equal XLA's convolution; which runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.ops import xla
from medjax.ops.cpu import conv as cpu_conv
from medjax.ops.cpu import onednn

_DEPTH_TAPS = cpu_conv._conv3d_by_depth_taps
_PATCHES = cpu_conv._conv_by_patches
_DEPTH_FOLD = cpu_conv._conv3d_by_depth_fold
_TAP_CHANNELS = cpu_conv._conv3d_by_tap_channels
_DEPTH_STRIDE1 = cpu_conv._conv3d_depth_stride1  # tap channels forward, custom gradients


@pytest.mark.parametrize("lowering,shape,kernel,strides,padding", [
    (_DEPTH_TAPS, (2, 7, 6, 5, 3), (3, 3, 3), (1, 1, 1), "SAME"),
    (_DEPTH_TAPS, (2, 7, 6, 5, 3), (3, 3, 3), (2, 2, 2), "SAME"),
    (_DEPTH_TAPS, (2, 8, 6, 6, 3), (3, 3, 3), (2, 1, 2), "SAME"),
    (_DEPTH_TAPS, (2, 7, 6, 5, 3), (2, 3, 1), (3, 1, 1), "VALID"),
    (_DEPTH_TAPS, (2, 4, 6, 6, 3), (1, 1, 1), (2, 2, 2), "SAME"),
    (_DEPTH_TAPS, (1, 5, 4, 4, 2), (4, 3, 3), (1, 1, 1), "SAME"),
    (_DEPTH_FOLD, (2, 7, 6, 5, 1), (3, 3, 3), (1, 1, 1), "SAME"),
    (_DEPTH_FOLD, (2, 8, 6, 6, 2), (3, 3, 3), (2, 1, 2), "SAME"),
    (_DEPTH_FOLD, (2, 7, 6, 5, 3), (2, 3, 1), (3, 1, 1), "VALID"),
    (_DEPTH_FOLD, (1, 5, 4, 4, 1), (4, 3, 3), (1, 1, 1), "SAME"),
    (_DEPTH_FOLD, (2, 4, 6, 6, 1), (1, 1, 1), (2, 2, 2), "SAME"),
    (_TAP_CHANNELS, (2, 7, 6, 5, 3), (3, 3, 3), (1, 1, 1), "SAME"),
    (_TAP_CHANNELS, (2, 7, 6, 5, 3), (2, 3, 1), (1, 2, 1), "VALID"),
    (_TAP_CHANNELS, (1, 5, 4, 4, 2), (4, 3, 3), (1, 1, 1), "SAME"),
    (_DEPTH_STRIDE1, (2, 7, 6, 5, 3), (3, 3, 3), (1, 1, 1), "SAME"),  # input gradient by tap channels
    (_DEPTH_STRIDE1, (2, 6, 6, 6, 3), (1, 3, 3), (1, 1, 1), "SAME"),
    (_DEPTH_STRIDE1, (2, 2, 6, 6, 3), (3, 3, 3), (1, 1, 1), "SAME"),  # fewer slices than taps
    (_DEPTH_STRIDE1, (2, 7, 6, 5, 3), (3, 3, 3), (1, 2, 2), "SAME"),  # gradients by the taps
    (_DEPTH_STRIDE1, (2, 7, 6, 5, 3), (2, 3, 1), (1, 1, 1), "VALID"),
    (_DEPTH_STRIDE1, (1, 5, 4, 4, 2), (4, 3, 3), (1, 1, 1), "SAME"),
    (_DEPTH_STRIDE1, (1, 1, 4, 4, 2), (4, 3, 3), (1, 1, 1), "SAME"),  # one slice
    (_PATCHES, (3, 2, 2, 4), (3, 3), (1, 1), "SAME"),
    (_PATCHES, (3, 4, 4, 4), (3, 3), (2, 2), "SAME"),
    (_PATCHES, (3, 5, 3, 4), (3, 2), (2, 1), "VALID"),
    (_PATCHES, (2, 2, 3, 3, 4), (3, 3, 3), (1, 1, 1), "SAME"),
    (_PATCHES, (3, 4, 4, 4), (1, 1), (2, 2), "SAME")])
def test_cpu_lowerings_equal_native_values_and_gradients(lowering, shape, kernel, strides,
                                                         padding):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), kernel + (shape[-1], 5))
  f = lambda fn: lambda x, w: jnp.sum(jnp.cos(fn(x, w, strides, padding)))
  np.testing.assert_allclose(lowering(x, w, strides, padding),
                             xla.conv(x, w, strides, padding),
                             rtol=1e-5, atol=1e-5)
  ours = jax.grad(f(lowering), argnums=(0, 1))(x, w)
  ref = jax.grad(f(xla.conv), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,kernel,strides,lowering", [
    ((1, 6, 6, 6, 2), (3, 3, 3), (1, 1, 1), "_conv3d_by_depth_fold"),  # few input channels
    ((1, 6, 6, 6, 8), (3, 3, 3), (1, 1, 1), "_conv3d_depth_stride1"),
    ((1, 6, 6, 6, 8), (3, 3, 3), (2, 2, 2), "_conv3d_by_depth_taps"),
    ((1, 2, 6, 6, 8), (1, 3, 3), (1, 2, 2), "_conv_by_patches"),  # slices of 3×3 outputs
    ((1, 4, 4, 8), (3, 3), (2, 2), None),  # 2-D: XLA's own, even at 2×2 outputs
    ((1, 9, 9, 8), (3, 3), (1, 1), None)])
def test_without_onednn_each_shape_gets_its_lowering(shape, kernel, strides, lowering,
                                                     monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: False)
  called = []
  if lowering is not None:
    original = getattr(cpu_conv, lowering)
    monkeypatch.setattr(cpu_conv, lowering, lambda *a: called.append(lowering) or original(*a))
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), kernel + (shape[-1], 4))
  np.testing.assert_allclose(cpu_conv.conv(x, w, strides, "SAME"),
                             xla.conv(x, w, strides, "SAME"), rtol=1e-5, atol=1e-5)
  assert called == ([lowering] if lowering else [])
