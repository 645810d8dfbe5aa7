"""N-D convolution (channels-last) for every medjax model, with its lowering chosen in one place.

On CPU, float32 convolutions of every rank go to oneDNN, the library PyTorch's CPU convolutions
use (``medjax.models.onednn``: XLA FFI handlers for the forward and both gradients). One core,
forward + both gradients, oneDNN vs the best XLA lowering below: 3×3 64→64 at 28², batch 64,
96 vs 153 ms; 128→128 at 14², 70 vs 109 ms; U-Net 16→16 at 40×56×40, batch 2, 82 vs 223 ms;
1→16 there 34 vs 67 ms; 3-D ResNet 64→64 at 14³, batch 16, 154 vs 358 ms. Whole train steps on
2 cores: ResNet-18 2-D 135 vs 85 images/s, 3-D U-Net 0.38 vs 0.65 s (README, Speed). 3×3×3
stride-1 convolutions of 8k channels run as a Winograd F(2×2×2, 3×3×3) there instead, forward
and both gradients, on AVX2 CPUs without AVX-512 (``onednn.winograd_applies``).

The XLA lowerings below stay for everything else: other dtypes, modules traced inside
`portable()` (``jax.export`` artefacts, which must run without medjax), and hosts where oneDNN
cannot be built. Measured on the 2-core CPU (jax 0.10.2, one core, forward + both gradients):
- 2-D: XLA's own convolution is the fastest form found (3×3, 64→64, 28², batch 64: 85 ms).
  im2col patches + one matmul, nine shifted matmuls, flattened-row shifts, bf16, and rows-as-1-D
  convolutions were all slower (XLA:CPU packs the filter gradient's large-K, small-M/N
  contraction poorly); XLA's oneDNN/XNNPACK flags changed nothing.
- 3-D: XLA:CPU's 3-D convolution is far slower than its 2-D one (3×3×3, 64→64, 14³, batch 16:
  588 ms). Written as a sum over the kernel's depth taps of 2-D convolutions on depth slices
  folded into the batch, the same result takes 248 ms (2.4× faster); ``_conv3d_by_depth_taps``.
- 3-D with few input channels (≤ ``FOLD_MAX_CHANNELS``: the first layer of a CT/MR network):
  three 1-channel 2-D convolutions starve the matmul, so the depth taps are folded into the
  channels instead — one 2-D convolution of ``kd × C`` channels (``_conv3d_by_depth_fold``).
  Forward + both gradients, one core: U-Net first layer (1→16, 40×56×40, batch 2) 36 → 13 ms;
  3-D ResNet stem (1→64, stride 2, 28³, batch 16) 27 → 16 ms; 4→16 61 → 26 ms. At 16 channels
  and more the fold is slower (16→16 at 40×56×40: 95 ms taps vs 109 ms fold), so there the taps stay.
- 3-D with depth stride 1 and more channels (most U-Net convolutions): the forward is one 2-D
  convolution whose ``kd × O`` outputs are every depth tap's, summed with each tap's depth shift
  in one fused pass (``_conv3d_by_tap_channels``): no padded, sliced copies of the input, and a
  wider matmul. Its input gradient, for stride 1 / SAME, is the same kind of convolution; its
  kernel gradient is one 2-D kernel gradient per tap over all input slices against the output
  gradient shifted by the tap (``_conv3d_depth_stride1``, a custom VJP): shifting the gradient
  copies less than slicing a padded input (32→16 at 40×56×40, batch 2: 174 → 80 ms). Same
  process, ``TAP_CHANNELS`` on/off: sliding-window inference of the hippocampus U-Net 1.48 →
  1.13 s (1.31×); its train step 1.15 → 0.82 s (1.40×); the 3-D ResNet-18 step (14³ and
  smaller, 64+ channels) about the same (12.5–13.8 images/s either way).
- Tiny outputs (≤ ``SMALL_OUTPUT_PIXELS`` per slice, e.g. ResNet stage 4 at 2×2): XLA:CPU sends
  some of their gradients to a generic loop, 400 ms for a 300-MFLOP conv; im2col + one matmul
  (``_conv_by_patches``) is cheap at that size. Together: 3-D ResNet-18 train step at 28³, batch
  32, 2.7 → 11.7 images/s (``benchmarks/train_step_vs_torch.py --dims 3 --stem_stride 2``).
- What is left, 2-D: the forward and input gradient run at PyTorch/oneDNN's speed, the kernel
  gradient at half of it (3×3, 64→64, 28², batch 64, one core: 35–48 ms vs 18 ms). Tried for it
  and slower: nine per-tap matmuls (either operand order), im2col, batched per image, flattened
  rows, Winograd F(2×2, 3×3) (forward 3× slower: its transforms are memory-bound here), and the
  XNNPACK / YNNPACK / oneDNN fusion flags of this jaxlib (no change).
- XLA:CPU runs each of these on one thread, so without oneDNN ``launch.py`` gives the
  data-parallel mesh one host device per core (``medjax.host.use_every_core``).
GPUs and TPUs keep the native convolution for every rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from medjax.models import onednn

# Up to this many input channels a 3-D convolution folds its depth taps into the channels.
FOLD_MAX_CHANNELS = 4

# Below this many output pixels per image, XLA:CPU lowers some convolution gradients to a slow
# generic loop (3-D ResNet stage 4 at 2×2: 400 ms for a 300-MFLOP conv); im2col is cheap there.
SMALL_OUTPUT_PIXELS = 16


def dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last layouts for an ``nd``-D convolution (``NHWC``/``HWIO`` and 1-/3-D kin)."""
  if nd not in (1, 2, 3):
    raise ValueError(f"convolutions of rank {nd} are not supported (1-, 2- or 3-D only)")
  spatial = "DHW"[-nd:]
  return lax.conv_dimension_numbers(
      (1,) * (nd + 2), (1,) * (nd + 2),
      ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))


def native_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: str) -> jax.Array:
  """XLA's convolution of ``x [B, *spatial, C]`` with ``kernel [*k, C, O]``."""
  return lax.conv_general_dilated(x, kernel, tuple(strides), padding,
                                  dimension_numbers=dimension_numbers(x.ndim - 2))


def _pads(size: int, k: int, stride: int, padding: str) -> tuple[int, int]:
  """Low/high padding of one spatial dim, by lax's rules."""
  if padding == "VALID":
    return 0, 0
  if padding == "SAME":  # output ceil(size / stride); the odd pixel of padding goes at the end
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    return total // 2, total - total // 2
  raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def _out_size(size: int, k: int, stride: int, padding: str) -> int:
  lo, hi = _pads(size, k, stride, padding)
  return (size + lo + hi - k) // stride + 1


def _conv_by_patches(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                     padding: str) -> jax.Array:
  """im2col + one matmul: the patches of every kernel offset side by side, times the kernel."""
  ks = kernel.shape[:-2]
  out = [_out_size(n, k, s, padding) for n, k, s in zip(x.shape[1:-1], ks, strides)]
  pads = [_pads(n, k, s, padding) for n, k, s in zip(x.shape[1:-1], ks, strides)]
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
  lo, hi = _pads(x.shape[1], kd, sd, padding)
  d_out = _out_size(x.shape[1], kd, sd, padding)
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
  lo, _ = _pads(d, kd, 1, padding)
  d_out = _out_size(d, kd, 1, padding)
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
  lo, _ = _pads(d, kernel.shape[0], 1, padding)
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

# Benchmarks' A/B switch: False sends depth-stride-1 convolutions through the taps both ways.
TAP_CHANNELS = True


def _cpu_conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: str) -> jax.Array:
  out = [_out_size(n, k, s, padding)
         for n, k, s in zip(x.shape[1:-1], kernel.shape[:-2], strides)]
  if out[0] * out[1] <= SMALL_OUTPUT_PIXELS:
    return _conv_by_patches(x, kernel, strides, padding)
  return native_conv(x, kernel, strides, padding)


_PORTABLE = contextvars.ContextVar("medjax_portable_convolutions", default=False)


@contextlib.contextmanager
def portable():
  """Within it, `conv` traces to XLA operations only (no oneDNN custom calls): for modules
  serialised with ``jax.export`` and run where medjax is not installed."""
  token = _PORTABLE.set(True)
  try:
    yield
  finally:
    _PORTABLE.reset(token)


def runs_on_onednn(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether `conv` and `conv_transpose` of these operands go to oneDNN (the CPU backend,
  float32, 1- to 3-D, outside `portable()`, handlers built)."""
  return (jax.default_backend() == "cpu" and x.dtype == kernel.dtype == jnp.float32
          and x.ndim in (3, 4, 5) and not _PORTABLE.get() and onednn.available())


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
  """Convolution of ``x [B, *spatial, C]`` with ``kernel [*k, C, O]``; returns ``[B, *s', O]``.

  Uses the fastest correct lowering for the default backend (see the module docstring).
  """
  if runs_on_onednn(x, kernel):
    pads = tuple(_pads(n, k, s, padding)
                 for n, k, s in zip(x.shape[1:-1], kernel.shape[:-2], strides))
    return onednn.conv(x, kernel, tuple(strides), pads)
  if jax.default_backend() == "cpu":
    if x.ndim == 5:
      if x.shape[-1] <= FOLD_MAX_CHANNELS:
        lowering = _conv3d_by_depth_fold
      elif strides[0] == 1 and TAP_CHANNELS:
        lowering = _conv3d_depth_stride1
      else:
        lowering = _conv3d_by_depth_taps
      return lowering(x, kernel, tuple(strides), padding)
    if x.ndim == 4:
      return _cpu_conv2d(x, kernel, tuple(strides), padding)
  return native_conv(x, kernel, strides, padding)


def conv_transpose(y: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[tuple[int, int]], x_shape: Sequence[int]) -> jax.Array:
  """The adjoint of the convolution of ``x_shape`` inputs with ``kernel [*k, C, O]``, strides and
  explicit ``(low, high)`` padding, applied to ``y [B, *t, O]``: a transposed convolution to
  ``x_shape``. oneDNN runs it where it runs `conv` (as its input gradient); elsewhere it is the
  linear transpose of XLA's convolution.
  """
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  if runs_on_onednn(y, kernel):
    return onednn.conv_transpose(y, kernel, strides, padding, x_shape)
  x = jax.ShapeDtypeStruct(tuple(x_shape), y.dtype)
  return jax.linear_transpose(
      lambda x: lax.conv_general_dilated(x, kernel, strides, padding,
                                         dimension_numbers=dimension_numbers(len(x_shape) - 2)),
      x)(y)[0]
