"""The U-Net's up-sampling folded into the convolution that reads it, on the CPU.

``medjax.ops.upsample_concat_conv`` computes ``conv(concat(up, skip), W)``, where ``up`` is the
kernel = stride transposed convolution (kernel ``U``, bias ``b``, strides ``s``) of the
low-resolution ``x``, and ``W`` a stride-1, ``SAME`` convolution with an odd kernel. That is
linear in ``x``: ``conv(skip, W_skip) + conv_transpose(x, U ∘ W_up) + conv(b, W_up)``, where
``U ∘ W_up`` is a composite kernel of ``s + k - 1`` taps per axis applied with stride ``s``, and
``conv(b, W_up)`` a fixed map, constant except within ``k // 2`` voxels of the border. The
up-sampled map and the concatenation are never built, and fewer multiply-adds remain (stride 2,
3×3×3, per output voxel: 8·C·F + 27·F² instead of C·F + 54·F², with C the low-resolution
channels, F the skip's and the output's).

It is chosen (`applies`) only where oneDNN runs the convolutions and the up-sampled map is large
(`FOLD_MIN_BYTES`): what it saves is memory traffic, while oneDNN's transposed convolution and the
two smaller convolutions run at a lower share of the CPU's peak than the one concatenated
convolution, and the composite kernel is recomputed at every call. On a GPU the fold made the
train step slower, so ``medjax.ops`` never calls it there. ``docs/performance-kernels.md`` has the
figures.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medjax.ops.cpu import conv as cpu_conv

# Benchmarks' A/B switch, read at trace time: False builds every up-sampled map.
FOLD = True

# Up-sampled maps smaller than this per image are built: they stay in the CPU's caches, so
# folding saves little memory traffic and costs a composite kernel per call. (Per image, not per
# batch: exported models have a symbolic batch size.)
FOLD_MIN_BYTES = 1 << 20


def applies(x: jax.Array, up_kernel: jax.Array, skip: jax.Array, kernel: jax.Array) -> bool:
  """Whether `upsample_concat_conv` is chosen for these operands: the switch on, oneDNN runs the
  convolutions, the up-sampled map fills the skip exactly (no crop), the kernel is odd and the
  up-sampled map is at least `FOLD_MIN_BYTES` per image."""
  nd = x.ndim - 2
  strides = up_kernel.shape[:nd]
  up_size = tuple(n * s for n, s in zip(x.shape[1:-1], strides))
  return (FOLD and up_size == tuple(skip.shape[1:-1])
          and all(k % 2 for k in kernel.shape[:nd])
          and math.prod(up_size) * up_kernel.shape[-1] * x.dtype.itemsize >= FOLD_MIN_BYTES
          and cpu_conv.onednn_applies(x, kernel) and cpu_conv.onednn_applies(skip))


def composite_kernel(up_kernel: jax.Array, kernel: jax.Array) -> jax.Array:
  """``U ∘ W``: the kernel ``[*(s + k - 1), F_out, C]`` of the transposed convolution (stride
  ``s``, padding ``k // 2`` each side, ``conv_transpose``'s layout) that equals the up-sampling by
  ``up_kernel [*s, C, F]`` followed by the stride-1 ``SAME`` convolution by ``kernel
  [*k, F, F_out]``."""
  nd = up_kernel.ndim - 2
  # Axis by axis, composite tap t takes up-sampling phase a through conv tap w = a - t + 2p
  # (p = k // 2): output voxel n = s·j + t - p reads up-sampled voxel n + w - p = s·j + a.
  selections, subscripts = [], []
  for d, (s, k) in enumerate(zip(up_kernel.shape[:nd], kernel.shape[:nd])):
    p = k // 2
    select = np.zeros((s + 2 * p, s, k), np.float32)
    for t, a in itertools.product(range(s + 2 * p), range(s)):
      if 0 <= a - t + 2 * p < k:
        select[t, a, a - t + 2 * p] = 1
    selections += [select, [d, nd + d, 2 * nd + d]]
    subscripts.append(d)
  c, m, f = 3 * nd, 3 * nd + 1, 3 * nd + 2  # low channels, up-sampled channels, output channels
  return jnp.einsum(*selections, up_kernel.astype(jnp.float32), [*range(nd, 2 * nd), c, m],
                    kernel.astype(jnp.float32), [*range(2 * nd, 3 * nd), m, f],
                    [*subscripts, f, c])


def bias_map(bias: jax.Array, kernel: jax.Array, size: tuple[int, ...]) -> jax.Array:
  """``conv(b, kernel)`` of a map of ``size`` holding ``bias [F]`` at every voxel (``SAME``, so
  zero outside): ``[*size, F_out]``. It is constant but within ``k // 2`` voxels of a border, so
  it is convolved on a box of ``2p + 1`` voxels per axis (the border rows and one inner row) and
  the inner row repeated."""
  nd = len(size)
  taps = kernel.shape[:nd]
  box = [min(n, k) for n, k in zip(size, taps)]
  out = cpu_conv.conv(jnp.broadcast_to(bias, (1, *box, bias.shape[-1])), kernel, (1,) * nd,
                      "SAME")[0]
  for axis, (n, b, k) in enumerate(zip(size, box, taps)):
    if n > b:  # concatenated, not jnp.repeat: XLA:CPU fuses that into its consumers as a gather
      p = k // 2
      inner = lax.slice_in_dim(out, p, p + 1, axis=axis)
      inner = jnp.broadcast_to(inner, inner.shape[:axis] + (n - 2 * p,) + inner.shape[axis + 1:])
      out = jnp.concatenate([lax.slice_in_dim(out, 0, p, axis=axis), inner,
                             lax.slice_in_dim(out, p + 1, b, axis=axis)], axis=axis)
  return out


@jax.custom_vjp
def add_to_every_sample(x: jax.Array, value: jax.Array) -> jax.Array:
  """``x + value``: ``value`` (``x.shape[1:]``) added to each sample of the batch ``x``.

  Its gradient in ``value`` sums the batch as a product with ones rather than a reduction over the
  leading axis, which XLA:CPU gives to YNNPACK, many times slower on these maps (also a plain
  contraction for a batch sharded over devices).
  """
  return x + value


def _add_to_every_sample_fwd(x, value):
  return x + value, None


def _add_to_every_sample_bwd(_, g):
  return g, jnp.tensordot(jnp.ones(g.shape[0], g.dtype), g, axes=1)


add_to_every_sample.defvjp(_add_to_every_sample_fwd, _add_to_every_sample_bwd)


def upsample_concat_conv(x: jax.Array, up_kernel: jax.Array, up_bias: jax.Array,
                         skip: jax.Array, kernel: jax.Array) -> jax.Array:
  """``medjax.ops.upsample_concat_conv`` folded (module docstring), for operands where
  `applies`."""
  nd = x.ndim - 2
  dtype = x.dtype
  strides = tuple(up_kernel.shape[:nd])
  features = up_kernel.shape[-1]
  kernel = kernel.astype(dtype)
  w_up, w_skip = kernel[..., :features, :], kernel[..., features:, :]
  size = tuple(skip.shape[1:-1])
  out_shape = (x.shape[0], *size, kernel.shape[-1])
  pads = [(k // 2, k // 2) for k in kernel.shape[:nd]]
  y = cpu_conv.conv_transpose(x, composite_kernel(up_kernel, w_up).astype(dtype), strides, pads,
                              out_shape)
  y = y + cpu_conv.conv(skip.astype(dtype), w_skip, (1,) * nd, "SAME")
  return add_to_every_sample(y, bias_map(up_bias.astype(dtype), w_up, size))
