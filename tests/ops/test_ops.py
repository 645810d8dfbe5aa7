"""Tests of medjax/ops/__init__.py: the backend's choice equals the XLA forms, and stays off the
CPU kernels where it must."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from medjax import ops
from medjax.ops import xla


def _operands(x_shape, kernel_shape, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kx, x_shape), jax.random.normal(kw, kernel_shape)


@pytest.mark.parametrize("x_shape,kernel_shape,strides", [
    ((2, 6, 7, 8), (3, 3, 8, 8), (1, 1)),
    ((2, 6, 6, 5, 8), (3, 3, 3, 8, 8), (1, 1, 1)),
    ((2, 6, 6, 5, 2), (3, 3, 3, 2, 4), (2, 2, 1))])
def test_ops_equal_the_xla_forms(x_shape, kernel_shape, strides):
  x, w = _operands(x_shape, kernel_shape)
  y = ops.conv(x, w, strides, "SAME")
  np.testing.assert_allclose(y, xla.conv(x, w, strides, "SAME"), rtol=1e-4, atol=1e-4)
  pads = [xla.pads(n, k, s, "SAME") for n, k, s in zip(x_shape[1:-1], kernel_shape, strides)]
  np.testing.assert_allclose(ops.conv_transpose(y, w, strides, pads, x_shape),
                             xla.conv_transpose(y, w, strides, pads, x_shape),
                             rtol=1e-4, atol=1e-3)
  scale, bias = jnp.linspace(0.5, 1.5, x_shape[-1]), jnp.linspace(-1, 1, x_shape[-1])
  np.testing.assert_allclose(ops.instance_norm_leaky_relu(x, scale, bias),
                             xla.instance_norm_leaky_relu(x, scale, bias, 1e-5, 0.01),
                             rtol=1e-4, atol=1e-4)


def test_portable_traces_to_xla_operations_only():
  x, w = _operands((2, 6, 6, 5, 8), (3, 3, 3, 8, 8))
  scale = bias = jnp.ones(8)

  def f(x, w):
    y = ops.conv(x, w, (1, 1, 1), "SAME")
    y = ops.instance_norm_leaky_relu(y, scale, bias)
    return ops.conv_transpose(y, w, (1, 1, 1), [(1, 1)] * 3, x.shape)

  with ops.portable():
    hlo = jax.jit(f).lower(x, w).as_text()
  assert "custom_call" not in hlo and "convolution" in hlo


def test_bf16_operands_run_the_xla_forms():
  """The CPU kernels and lowerings are float32's: bfloat16 operands get XLA's own operations (no
  custom call), whose results these are."""
  x, w = (a.astype(jnp.bfloat16) for a in _operands((2, 6, 6, 5, 8), (3, 3, 3, 8, 8)))
  up, skip = jnp.ones((2, 2, 2, 8, 8), jnp.bfloat16), jnp.ones((2, 12, 12, 10, 8), jnp.bfloat16)

  def f(x, w):
    y = ops.conv(x, w, (1, 1, 1), "SAME")
    y = ops.conv_transpose(y, w, (1, 1, 1), [(1, 1)] * 3, x.shape)
    z = ops.upsample_concat_conv(y, up, jnp.zeros(8, y.dtype), skip, jnp.repeat(w, 2, axis=3))
    return y, z

  hlo = jax.jit(f).lower(x, w).as_text()
  assert "custom_call" not in hlo and "convolution" in hlo
  want = xla.conv_transpose(xla.conv(x, w, (1, 1, 1), "SAME"), w, (1, 1, 1), [(1, 1)] * 3,
                            x.shape)
  np.testing.assert_array_equal(np.asarray(f(x, w)[0], np.float32), np.asarray(want, np.float32))


def test_a_process_whose_default_backend_is_not_the_cpu_never_builds(tmp_path):
  """With JAX's default backend reported as a GPU, every op traces to XLA's forms, and
  ``medjax.ops.cpu`` is never imported: no C++ is compiled (the cache stays empty)."""
  code = ("import sys, jax, jax.numpy as jnp\n"
          "jax.default_backend = lambda: 'gpu'\n"
          "from medjax import ops\n"
          "from medjax.models import unet\n"
          "x, w = jnp.ones((2, 8, 8, 8, 1)), jnp.ones((3, 3, 3, 8, 8))\n"
          "m = unet.UNet(num_classes=2, features=(8, 16))\n"
          "v = jax.eval_shape(m.init, jax.random.key(0), x)\n"
          "hlo = jax.jit(m.apply).lower(v, x).as_text()\n"
          "hlo += jax.jit(lambda y, w: ops.conv_transpose(y, w, (1, 1, 1), [(1, 1)] * 3,"
          " (2, 8, 8, 8, 8))).lower(x.repeat(8, -1), w).as_text()\n"
          "print('custom_call' in hlo, 'medjax.ops.cpu' in sys.modules)\n")
  cache = tmp_path / "cache"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "MEDJAX_CACHE_DIR": str(cache)},
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["False", "False"]
  assert not cache.exists()
