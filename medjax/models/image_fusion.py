"""A pixel-level image-fusion network: two co-registered sources in, one fused image out.

The design follows DenseFuse (Li & Wu, IEEE TIP 2019): a shared encoder, one 3×3 convolution
then a dense block whose every layer reads all the previous layers' features, applied to each
source alone; a decoder of plain 3×3 convolutions narrowing to one channel. Unlike DenseFuse,
which trains the encoder–decoder as an auto-encoder and fuses features by a fixed rule (addition
or l1-norm weighting) at test time, the fusion step here is learned end to end (the two sources'
features concatenated, then a convolution), trained with the unsupervised losses of the later
papers (SSIM to both sources, a gradient and an intensity term: SwinFusion 2022, CDDFuse 2023;
``medjax.train.tasks.fusion``). No normalisation layers (as DenseFuse): the fused intensities keep
the sources' scale, and evaluation computes exactly what training did.

Input ``[B, H, W, S]``: the ``S`` sources (2 for a pair) as channels in [0, 1]; output ``[B, H, W,
num_classes]`` in [0, 1] (a sigmoid), ``num_classes`` = 1 for a grey fused image.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax import registry
from medjax.models.layers import Conv

# He-normal over fan-in for the leaky ReLUs (as the U-Net's convolutions).
_he_init = nn.initializers.variance_scaling(2.0 / (1.0 + 0.1**2), "fan_in", "normal")


@registry.register("models.dense_fusion")
class DenseFusion(nn.Module):
  """DenseFuse-style encoder (shared by the sources), learned fusion layer, decoder.

  Attributes:
    num_classes: output channels (1: the fused grey image).
    features: channels of the encoder's first convolution and of each dense layer.
    dense_layers: layers of the dense block; the encoder gives ``features * (1 + dense_layers)``
      channels per source (DenseFuse: 16 and 3, so 64).
    decoder: widths of the decoder's convolutions before the output one (DenseFuse: 64, 32, 16).
    negative_slope: of the leaky ReLUs.
    dtype: computation dtype (parameters stay float32).
  """

  num_classes: int = 1
  features: int = 16
  dense_layers: int = 3
  decoder: Sequence[int] = (64, 32, 16)
  negative_slope: float = 0.1
  dtype: Any = jnp.float32

  def _conv(self, features: int, name: str) -> Conv:
    return Conv(features, 3, use_bias=True, dtype=self.dtype, kernel_init=_he_init, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x: ``[B, H, W, S]`` sources in [0, 1]. Returns: ``[B, H, W, num_classes]``."""
    del train  # no dropout or normalisation: training and evaluation compute the same function
    act = lambda y: nn.leaky_relu(y, self.negative_slope)
    batch, sources = x.shape[0], x.shape[-1]
    # The shared encoder reads each source alone: sources folded into the batch axis.
    y = jnp.moveaxis(x, -1, 0).reshape((sources * batch, *x.shape[1:-1], 1))
    y = act(self._conv(self.features, "encoder_in")(y))
    for i in range(self.dense_layers):
      y = jnp.concatenate([y, act(self._conv(self.features, f"dense_{i}")(y))], axis=-1)
    # Fusion: each source's features side by side, mixed by a learned convolution.
    y = y.reshape((sources, batch, *y.shape[1:]))
    y = jnp.concatenate(list(y), axis=-1)
    y = act(self._conv(self.features * (1 + self.dense_layers), "fusion")(y))
    for i, width in enumerate(self.decoder):
      y = act(self._conv(width, f"decoder_{i}")(y))
    y = self._conv(self.num_classes, "decoder_out")(y)
    return nn.sigmoid(y.astype(jnp.float32))
