"""N-D convolution (channels-last) for every medjax model, with its lowering chosen in one place.

Measured on the 2-core CPU (jax 0.10.2; 3×3 conv, 64→64 channels, 28², batch 64, one core):
XLA's own convolution takes 17 ms forward and 37 ms for the filter gradient; the alternatives
tried — im2col patches + one matmul, nine shifted matmuls, flattened-row shifts, bf16 — all
took 2-4× longer for the filter gradient (XLA:CPU packs a large-K, small-M/N contraction
poorly), and XLA's oneDNN/XNNPACK flags changed nothing. XLA:CPU runs each convolution on one
thread, so the win on CPU is to give the data-parallel mesh one host device per core
(``launch.py`` does) rather than to rewrite the convolution. The native lowering therefore
serves every backend; a faster CPU kernel, when one exists, belongs in ``conv`` below.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax import lax


def dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Channels-last layouts for an ``nd``-D convolution (``NHWC``/``HWIO`` and 1-/3-D kin)."""
  if nd not in (1, 2, 3):
    raise ValueError(f"convolutions of rank {nd} are not supported (1-, 2- or 3-D only)")
  spatial = "DHW"[-nd:]
  return lax.conv_dimension_numbers(
      (1,) * (nd + 2), (1,) * (nd + 2),
      ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
  """Convolution of ``x [B, *spatial, C]`` with ``kernel [*k, C, O]``; returns ``[B, *s', O]``."""
  nd = x.ndim - 2
  return lax.conv_general_dilated(x, kernel, tuple(strides), padding,
                                  dimension_numbers=dimension_numbers(nd))
