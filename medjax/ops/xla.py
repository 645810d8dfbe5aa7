"""The portable forms of medjax's ops: plain XLA operations, what GPUs and TPUs run.

Also what exported modules hold (`medjax.ops.portable`) and what the CPU falls back to where its
own kernels do not apply. Every other implementation of an op must equal these up to float
rounding; the tests compare against them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last layouts for an ``nd``-D convolution (``NHWC``/``HWIO`` and 1-/3-D kin)."""
  if nd not in (1, 2, 3):
    raise ValueError(f"convolutions of rank {nd} are not supported (1-, 2- or 3-D only)")
  spatial = "DHW"[-nd:]
  return lax.conv_dimension_numbers(
      (1,) * (nd + 2), (1,) * (nd + 2),
      ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))


def pads(size: int, k: int, stride: int, padding: str) -> tuple[int, int]:
  """Low/high padding of one spatial dim of size ``size`` for a ``k``-tap kernel, by lax's rules."""
  if padding == "VALID":
    return 0, 0
  if padding == "SAME":  # output ceil(size / stride); the odd pixel of padding goes at the end
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    return total // 2, total - total // 2
  raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def out_size(size: int, k: int, stride: int, padding: str) -> int:
  """Output size of one spatial dim, by lax's rules."""
  lo, hi = pads(size, k, stride, padding)
  return (size + lo + hi - k) // stride + 1


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
  """XLA's convolution of ``x [B, *spatial, C]`` with ``kernel [*k, C, O]``."""
  return lax.conv_general_dilated(x, kernel, tuple(strides), padding,
                                  dimension_numbers=dimension_numbers(x.ndim - 2))


def conv_transpose(y: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[tuple[int, int]], x_shape: Sequence[int]) -> jax.Array:
  """The linear transpose of XLA's convolution of ``x_shape`` inputs, applied to ``y``."""
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  x = jax.ShapeDtypeStruct(tuple(x_shape), y.dtype)
  return jax.linear_transpose(
      lambda x: lax.conv_general_dilated(x, kernel, strides, padding,
                                         dimension_numbers=dimension_numbers(len(x_shape) - 2)),
      x)(y)[0]


def upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The transposed convolution with kernel = stride of ``x [B, *X, C]`` by ``kernel [*s, C, F]``
  (PyTorch's ``ConvTranspose`` layout, unflipped), plus ``bias [F]``: ``[B, *(X · s), F]``.

  With kernel = stride the output blocks do not overlap: input voxel ``i`` alone fills output
  voxels ``s·i + k``, each as ``x[i] @ kernel[k]``. That is one matmul and a depth-to-space
  reshape, exact for any rank and backend, with no convolution to lower.
  """
  nd = x.ndim - 2
  s = kernel.shape[:nd]
  y = jnp.tensordot(x, kernel.astype(x.dtype), axes=[[x.ndim - 1], [nd]])
  # [B, *X, *s, F] → [B, X1, s1, X2, s2, ..., F] → [B, X1·s1, X2·s2, ..., F]
  perm = (0, *(a for i in range(nd) for a in (1 + i, 1 + nd + i)), 1 + 2 * nd)
  shape = (x.shape[0], *(n * k for n, k in zip(x.shape[1:-1], s)), kernel.shape[-1])
  return y.transpose(perm).reshape(shape) + bias.astype(x.dtype)


def instance_norm_leaky_relu(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                             negative_slope: float) -> jax.Array:
  """jax.numpy's instance norm (flax's: variance as E[x²] − E[x]², at least 0) + leaky ReLU."""
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x, axes, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes, keepdims=True) - jnp.square(mean))
  z = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
  return jnp.where(z > 0, z, negative_slope * z)
