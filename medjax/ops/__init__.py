"""The ops medjax's models compute with, and the one place that chooses how each runs.

`conv`, `conv_transpose`, `instance_norm_leaky_relu`, `upsample` and `upsample_concat_conv` are
plain functions. Where JAX's default backend is the CPU and the operands are float32, they go to
``medjax.ops.cpu`` (oneDNN's convolutions, a 3-D Winograd, a fused norm + activation, the U-Net's
up-sampling folded into the convolution that reads it, and XLA lowerings that suit XLA:CPU),
which builds its C++ kernels on first use. Everywhere else (GPUs, TPUs; bfloat16 on the CPU) they
are the plain XLA operations of ``medjax.ops.xla``. Inside `portable()` no custom call is
emitted: XLA operations only (on the CPU, its XLA lowerings). All forms give the same results up
to float rounding.

``medjax.ops.cpu`` is imported only once a CPU op is chosen: a process whose default backend is
not the CPU never imports it, and so never compiles C++.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import jax.numpy as jnp

from medjax.ops import xla

_PORTABLE = contextvars.ContextVar("medjax_portable_ops", default=False)


@contextlib.contextmanager
def portable():
  """Within it, the ops trace to XLA operations only (no custom calls to medjax's kernels): for
  modules serialised with ``jax.export`` and run where medjax is not installed."""
  token = _PORTABLE.set(True)
  try:
    yield
  finally:
    _PORTABLE.reset(token)


def _on_cpu(*operands: jax.Array) -> bool:
  """Whether the CPU implementations are chosen: JAX's default backend is the CPU and the
  ``operands`` are float32, the one dtype its kernels and lowerings are written and tested for
  (bfloat16, ``train.precision="bf16"``, runs the XLA forms). Checked at every call, before
  ``medjax.ops.cpu`` is imported."""
  return jax.default_backend() == "cpu" and all(a.dtype == jnp.float32 for a in operands)


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
  """Convolution of ``x [B, *spatial, C]`` with ``kernel [*k, C, O]`` (1- to 3-D, channels-last);
  ``padding`` is ``"SAME"`` or ``"VALID"``. Returns ``[B, *spatial', O]``."""
  if _on_cpu(x, kernel):
    from medjax.ops.cpu import conv as cpu_conv
    # Inside portable(), XLA:CPU's lowerings without the compiled kernels.
    return cpu_conv.conv(x, kernel, tuple(strides), padding, kernels=not _PORTABLE.get())
  return xla.conv(x, kernel, strides, padding)


def conv_transpose(y: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[tuple[int, int]], x_shape: Sequence[int]) -> jax.Array:
  """The adjoint of the convolution of ``x_shape`` inputs with ``kernel [*k, C, O]``, strides and
  explicit ``(low, high)`` padding, applied to ``y [B, *t, O]``: a transposed convolution to
  ``x_shape``."""
  if _on_cpu(y, kernel) and not _PORTABLE.get():
    from medjax.ops.cpu import conv as cpu_conv
    return cpu_conv.conv_transpose(y, kernel, strides, padding, x_shape)
  return xla.conv_transpose(y, kernel, strides, padding, x_shape)


def instance_norm_leaky_relu(x: jax.Array, scale: jax.Array, bias: jax.Array,
                             epsilon: float = 1e-5, negative_slope: float = 0.01) -> jax.Array:
  """Normalises ``x [B, *spatial, C]`` over its spatial axes per sample and channel, scales and
  shifts it by ``scale``, ``bias [C]``, then applies a leaky ReLU: flax's ``InstanceNorm``
  followed by ``nn.leaky_relu``, as one op."""
  if _on_cpu(x) and not _PORTABLE.get():
    from medjax.ops.cpu import norm_act
    return norm_act.instance_norm_leaky_relu(x, scale, bias, epsilon, negative_slope)
  return xla.instance_norm_leaky_relu(x, scale, bias, epsilon, negative_slope).astype(x.dtype)


def upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The transposed convolution with kernel = stride (nnU-Net's decoder up-sampling) of
  ``x [B, *X, C]`` by ``kernel [*s, C, F]`` (PyTorch's layout, unflipped), plus ``bias [F]``:
  ``[B, *(X · s), F]``. One matmul and a reshape on every backend."""
  return xla.upsample(x, kernel, bias)


def upsample_concat_conv(x: jax.Array, up_kernel: jax.Array, up_bias: jax.Array,
                         skip: jax.Array, kernel: jax.Array) -> jax.Array:
  """A U-Net decoder's up-sampling, skip connection and first convolution, as one op.

  ``x [B, *X, C]`` is up-sampled by `upsample` (``up_kernel [*s, C, F]``, ``up_bias [F]``),
  cropped to the size of ``skip [B, *spatial, S]`` (``X · s`` may exceed it by less than ``s``),
  concatenated with it (up-sampled channels first) and convolved with ``kernel [*k, F + S, O]``,
  stride 1, ``"SAME"``. Returns ``[B, *spatial, O]``, in ``x``'s dtype.

  On the CPU, large up-sampled maps are never built: the convolution is folded into the
  up-sampling (``medjax.ops.cpu.upsample_fold``). Elsewhere, and inside `portable()`, the
  sequence runs as written. Both give the same results up to float rounding.
  """
  if _on_cpu(x, skip, kernel) and not _PORTABLE.get():
    from medjax.ops.cpu import upsample_fold
    if upsample_fold.applies(x, up_kernel, skip, kernel):
      return upsample_fold.upsample_concat_conv(x, up_kernel, up_bias, skip, kernel)
  up = upsample(x, up_kernel, up_bias)
  # Spatial sizes not divisible by the strides: the extra voxels lie past the skip's end.
  up = up[(slice(None), *(slice(0, n) for n in skip.shape[1:-1]))]
  return conv(jnp.concatenate([up, skip.astype(up.dtype)], axis=-1), kernel.astype(up.dtype),
              (1,) * (x.ndim - 2), "SAME")
