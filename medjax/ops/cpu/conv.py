"""Convolutions on the CPU backend: oneDNN's where they apply, else XLA lowerings that suit XLA:CPU.

float32 convolutions of every rank go to oneDNN (``onednn``: forward and both gradients), whose
kernels are much faster than XLA:CPU's. The XLA lowerings here stay for everything else (other
dtypes, hosts where the handlers cannot be built):
- 1-D and 2-D: XLA's own convolution.
- 3-D: XLA:CPU's 3-D convolution is far slower than its 2-D one, so it is rewritten as 2-D ones:
  a sum over the kernel's depth taps (`_conv3d_by_depth_taps`); with few input channels
  (`FOLD_MAX_CHANNELS`) the taps folded into the channels (`_conv3d_by_depth_fold`); with depth
  stride 1 the taps as output channels, summed with their depth shifts, with custom gradients
  (`_conv3d_depth_stride1`). Those 2-D ones with tiny outputs (`SMALL_OUTPUT_PIXELS`), where
  XLA:CPU sends some gradients to a slow generic loop, are im2col + one matmul
  (`_conv_by_patches`).
XLA:CPU runs each of these on one thread, so without oneDNN ``medjax.host`` gives the
data-parallel mesh one host device per core. ``docs/performance-kernels.md`` has the figures.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from medjax.ops import xla
from medjax.ops.cpu import onednn

# Up to this many input channels a 3-D convolution folds its depth taps into the channels.
FOLD_MAX_CHANNELS = 4

# Up to this many output pixels per image, XLA:CPU lowers some convolution gradients to a slow
# generic loop (3-D ResNet stage 4 at 2×2); the 3-D lowerings' 2-D convolutions use im2col there.
SMALL_OUTPUT_PIXELS = 16


def _conv_by_patches(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                     padding: str) -> jax.Array:
  """im2col + one matmul: the patches of every kernel offset side by side, times the kernel."""
  ks = kernel.shape[:-2]
  out = [xla.out_size(n, k, s, padding) for n, k, s in zip(x.shape[1:-1], ks, strides)]
  pads = [xla.pads(n, k, s, padding) for n, k, s in zip(x.shape[1:-1], ks, strides)]
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  cols = []
  for offset in itertools.product(*(range(k) for k in ks)):
    start = (0, *offset, 0)
    limit = (x.shape[0], *(o + (m - 1) * s + 1 for o, m, s in zip(offset, out, strides)),
             x.shape[-1])
    cols.append(lax.slice(x, start, limit, (1, *strides, 1)))
  patches = jnp.concatenate(cols, axis=-1)
  return patches @ kernel.reshape(-1, kernel.shape[-1])


def _depth_tap_inputs(x: jax.Array, kd: int, sd: int, padding: str) -> list[jax.Array]:
  """For each depth tap ``k`` of a ``kd``-deep kernel, the depth slices ``k, k + sd, ...`` of
  the padded ``x [B, D, H, W, C]`` that it meets: ``kd`` arrays ``[B, D_out, H, W, C]``."""
  lo, hi = xla.pads(x.shape[1], kd, sd, padding)
  d_out = xla.out_size(x.shape[1], kd, sd, padding)
  if lo or hi:
    x = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
  return [lax.slice_in_dim(x, k, k + (d_out - 1) * sd + 1, stride=sd, axis=1) for k in range(kd)]


def _conv3d_by_depth_taps(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                          padding: str) -> jax.Array:
  """A 3-D convolution as a sum of 2-D ones: tap ``k`` of the kernel's depth convolves the
  depth slices ``k, k + stride, ...`` of the padded input, folded into the batch."""
  sd, sh, sw = strides
  out = None
  for k, slices in enumerate(_depth_tap_inputs(x, kernel.shape[0], sd, padding)):
    b, d_out = slices.shape[:2]
    y = _cpu_conv2d(slices.reshape(b * d_out, *slices.shape[2:]), kernel[k], (sh, sw), padding)
    out = y if out is None else out + y
  return out.reshape(b, d_out, *out.shape[1:])


def _conv3d_by_depth_fold(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                          padding: str) -> jax.Array:
  """A 3-D convolution as one 2-D one: the ``kd`` depth slices each output slice reads,
  side by side as channels (a slab of ``kd × C``), against the kernel folded the same way."""
  kd, c = kernel.shape[0], x.shape[-1]
  sd, sh, sw = strides
  # Channel k * C + i of the slab: tap k, input channel i (the kernel folds the same way).
  slab = jnp.concatenate(_depth_tap_inputs(x, kd, sd, padding), axis=-1)
  b, d_out = slab.shape[:2]
  folded = jnp.moveaxis(kernel, 0, 2).reshape(*kernel.shape[1:3], kd * c, kernel.shape[-1])
  y = _cpu_conv2d(slab.reshape(b * d_out, *slab.shape[2:]), folded, (sh, sw), padding)
  return y.reshape(b, d_out, *y.shape[1:])


def _conv3d_by_tap_channels(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                            padding: str) -> jax.Array:
  """A depth-stride-1 3-D convolution as one 2-D one whose outputs are the ``kd`` depth taps'
  (``kd × O`` channels) over every input slice, summed with each tap's depth shift."""
  _, sh, sw = strides
  b, d, h, w, c = x.shape
  kd, o = kernel.shape[0], kernel.shape[-1]
  lo, _ = xla.pads(d, kd, 1, padding)
  d_out = xla.out_size(d, kd, 1, padding)
  # Output channel t * O + j: tap t, output channel j.
  wide = jnp.moveaxis(kernel, 0, -2).reshape(*kernel.shape[1:3], c, kd * o)
  y = _cpu_conv2d(x.reshape(b * d, h, w, c), wide, (sh, sw), padding)
  y = y.reshape(b, d, *y.shape[1:3], kd, o)
  # Output slice i reads input slice i + t - lo through tap t. Shifting each tap's part (not a
  # padded y) lets XLA fuse the shifts and the sum into one pass.
  return sum(_shift_depth(y[..., t, :], lo - t, d_out) for t in range(kd))


def _shift_depth(a: jax.Array, shift: int, length: int) -> jax.Array:
  """``a [B, D, ...]`` moved ``shift`` slices along D and cut or zero-filled to ``length``
  slices: element ``i`` is ``a[:, i - shift]``, zero where that is outside ``a``."""
  pads = [(0, 0, 0)] * a.ndim
  pads[1] = (shift, length - a.shape[1] - shift, 0)  # lax.pad crops where negative
  return lax.pad(a, jnp.zeros((), a.dtype), pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv3d_depth_stride1(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                          padding: str) -> jax.Array:
  """Forward by ``_conv3d_by_tap_channels``; gradients as ``_conv3d_depth_stride1_bwd`` says."""
  return _conv3d_by_tap_channels(x, kernel, strides, padding)


def _conv3d_depth_stride1_fwd(x, kernel, strides, padding):
  return _conv3d_by_tap_channels(x, kernel, strides, padding), (x, kernel)


def _depth_stride1_kernel_grad(x: jax.Array, kernel: jax.Array, grad: jax.Array,
                               strides: Sequence[int], padding: str) -> jax.Array:
  """The kernel gradient of a depth-stride-1 3-D convolution, one 2-D kernel gradient per depth
  tap over all input slices, against the output gradient shifted by the tap (zero outside).
  Shifting the gradient instead of slicing a padded input copies less."""
  _, sh, sw = strides
  b, d = x.shape[:2]
  lo, _ = xla.pads(d, kernel.shape[0], 1, padding)
  slices = x.reshape(b * d, *x.shape[2:])
  taps = []
  for t in range(kernel.shape[0]):
    g = _shift_depth(grad, t - lo, d)  # input slice i meets output slice i - (t - lo)
    _, vjp = jax.vjp(lambda k: _cpu_conv2d(slices, k, (sh, sw), padding), kernel[t])
    taps.append(vjp(g.reshape(b * d, *g.shape[2:]))[0])
  return jnp.stack(taps)


def _conv3d_depth_stride1_bwd(strides, padding, residuals, grad):
  """Kernel gradient by ``_depth_stride1_kernel_grad``; input gradient by tap channels where
  it is a convolution of the same kind, otherwise by transposing ``_conv3d_by_depth_taps``."""
  x, kernel = residuals
  dk = _depth_stride1_kernel_grad(x, kernel, grad, strides, padding)
  if all(s == 1 for s in strides) and padding == "SAME" and all(k % 2 for k in kernel.shape[:3]):
    # Stride 1, SAME, odd kernel: the input gradient is the same kind of convolution, of the
    # output gradient with the kernel flipped in space and its channel axes swapped.
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], -1, -2)
    return _conv3d_by_tap_channels(grad, flipped, strides, padding), dk
  _, vjp = jax.vjp(lambda x: _conv3d_by_depth_taps(x, kernel, strides, padding), x)
  return vjp(grad)[0], dk


_conv3d_depth_stride1.defvjp(_conv3d_depth_stride1_fwd, _conv3d_depth_stride1_bwd)

# Benchmarks' A/B switches, read at trace time. TAP_CHANNELS False sends depth-stride-1
# convolutions through the taps both ways; ONEDNN False keeps every convolution (and so the fused
# norm) off the handlers, as MEDJAX_ONEDNN=0 does; LOWERINGS False gives what oneDNN does not take
# to XLA's native convolution instead of the lowerings here.
TAP_CHANNELS = True
ONEDNN = True
LOWERINGS = True


def _cpu_conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: str) -> jax.Array:
  out = [xla.out_size(n, k, s, padding)
         for n, k, s in zip(x.shape[1:-1], kernel.shape[:-2], strides)]
  if out[0] * out[1] <= SMALL_OUTPUT_PIXELS:
    return _conv_by_patches(x, kernel, strides, padding)
  return xla.conv(x, kernel, strides, padding)


def onednn_applies(x: jax.Array, kernel: jax.Array | None = None) -> bool:
  """Whether `conv` and `conv_transpose` of these operands go to oneDNN: float32, 1- to 3-D,
  handlers built (on the first call). ``kernel=None`` checks ``x`` alone."""
  return (ONEDNN and x.dtype == jnp.float32 and (kernel is None or kernel.dtype == jnp.float32)
          and x.ndim in (3, 4, 5) and onednn.available())


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str,
         kernels: bool = True) -> jax.Array:
  """Convolution of ``x [B, *spatial, C]`` with ``kernel [*k, C, O]``; returns ``[B, *s', O]``.

  oneDNN's where `onednn_applies` (and ``kernels``: False keeps to XLA operations, for exported
  modules), else the XLA lowering that suits the shape (module docstring).
  """
  if kernels and onednn_applies(x, kernel):
    pads = tuple(xla.pads(n, k, s, padding)
                 for n, k, s in zip(x.shape[1:-1], kernel.shape[:-2], strides))
    return onednn.conv(x, kernel, tuple(strides), pads)
  if not LOWERINGS:
    return xla.conv(x, kernel, strides, padding)
  if x.ndim == 5:
    if x.shape[-1] <= FOLD_MAX_CHANNELS:
      lowering = _conv3d_by_depth_fold
    elif strides[0] == 1 and TAP_CHANNELS:
      lowering = _conv3d_depth_stride1
    else:
      lowering = _conv3d_by_depth_taps
    return lowering(x, kernel, tuple(strides), padding)
  # 2-D: im2col for tiny outputs, as the 3-D lowerings do, gained nothing on the 2-D ResNet-18
  # train step (benchmarks/cpu_kernels.py), so XLA's own convolution runs.
  return xla.conv(x, kernel, strides, padding)


def conv_transpose(y: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[tuple[int, int]], x_shape: Sequence[int]) -> jax.Array:
  """The adjoint of the convolution of ``x_shape`` inputs with ``kernel``, applied to ``y``:
  oneDNN's input gradient run forward where `onednn_applies`, else XLA's linear transpose."""
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  if onednn_applies(y, kernel):
    return onednn.conv_transpose(y, kernel, strides, padding, x_shape)
  return xla.conv_transpose(y, kernel, strides, padding, x_shape)
