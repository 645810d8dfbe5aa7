"""ResNet classifiers (18/34/50) for 2-D and 3-D images from one linen module.

The spatial rank comes from the input (``[B, H, W, C]`` or ``[B, D, H, W, C]``), so the same
parameter names serve both; the kernel shapes differ. The default stem (3×3, stride 1, no
max-pool) suits MedMNIST's 28-pixel images, as in MedMNIST's and MONAI's small-input ResNets;
``stem_kernel=7, stem_stride=2, stem_pool=True`` is the classic ImageNet stem.

Multi-modal input (one channel per modality) is fused early (channels stacked, the default), or
late / gated on the pooled features of one trunk per modality (`medjax.models.fusion`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax import registry
from medjax.models import fusion as fusion_lib
from medjax.models.layers import ConvNormAct


class BasicBlock(nn.Module):
  """Two 3×3 convs with an identity (or 1×1 projection) shortcut."""

  features: int
  strides: int = 1
  dtype: Any = None
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ConvNormAct(self.features, 3, self.strides, dtype=self.dtype)(x, train)
    y = ConvNormAct(self.features, 3, 1, act=None, zero_init_scale=self.zero_init_residual,
                    dtype=self.dtype)(y, train)
    if x.shape[-1] != self.features or self.strides != 1:
      x = ConvNormAct(self.features, 1, self.strides, act=None, dtype=self.dtype)(x, train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1×1 reduce → 3×3 → 1×1 expand (×4), with a projection shortcut where shapes change."""

  features: int
  strides: int = 1
  dtype: Any = None
  zero_init_residual: bool = False
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = self.features * self.expansion
    y = ConvNormAct(self.features, 1, 1, dtype=self.dtype)(x, train)
    y = ConvNormAct(self.features, 3, self.strides, dtype=self.dtype)(y, train)
    y = ConvNormAct(out, 1, 1, act=None, zero_init_scale=self.zero_init_residual,
                    dtype=self.dtype)(y, train)
    if x.shape[-1] != out or self.strides != 1:
      x = ConvNormAct(out, 1, self.strides, act=None, dtype=self.dtype)(x, train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet over 2-D or 3-D inputs.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block: ``"basic"`` or ``"bottleneck"``.
    num_classes: width of the logits; 0 drops the head (and its dropout) and returns the pooled
      ``[B, F]`` features instead, for use as an encoder (e.g. per CT slice in ``sequence.py``).
    width: channels of the first stage (doubled at each later stage).
    stem_kernel, stem_stride: the first convolution's size and stride.
    stem_pool: a 3×3 (×3) stride-2 max-pool after the stem.
    dropout: dropout rate before the head.
    zero_init_residual: start each block's last norm scale at 0 (blocks start as identities).
    fusion: how the input's channels (one per modality) meet: ``"early"``, stacked at the stem;
      ``"late"`` / ``"gated"``, one headless ResNet per modality (``modality<m>``) whose pooled
      features are fused (``fuse``: concatenation + linear map, or Chen et al.'s gates) before
      the head. See `medjax.models.fusion`.
    dtype: compute dtype (``None`` keeps the input's); parameters stay float32.
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  num_classes: int = 2
  width: int = 64
  stem_kernel: int = 3
  stem_stride: int = 1
  stem_pool: bool = False
  dropout: float = 0.0
  zero_init_residual: bool = False
  fusion: str = "early"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Args: x: ``[B, *spatial, C]`` float. Returns: logits ``[B, num_classes]`` (and the pooled
    ``[B, F]`` features when ``return_features``); with ``num_classes=0`` the features alone."""
    if x.ndim not in (4, 5):
      raise ValueError(f"ResNet expects [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}")
    fusion_lib.check_fusion(self.fusion)
    if self.fusion == "early":
      features = self._trunk(x, train)
    else:
      # Each modality's trunk: this ResNet, single-modality and headless.
      trunk = functools.partial(self.clone, parent=self, num_classes=0, dropout=0.0,
                                fusion="early")
      feats = [trunk(name=f"modality{m}")(xm, train)
               for m, xm in enumerate(fusion_lib.split_modalities(x))]
      features = fusion_lib.fusion_block(self.fusion, feats[0].shape[-1], name="fuse")(feats)
    self.sow("intermediates", "embedding", features)  # exported by medjax.infer.features
    if self.num_classes == 0:  # headless: no Dense/Dropout, so no unused head parameters
      return features
    h = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32)(h)
    return (logits, features) if return_features else logits

  def _trunk(self, x: jax.Array, train: bool) -> jax.Array:
    """Stem and stages (named in this module's scope), pooled: ``[B, *spatial, C]`` → ``[B, F]``."""
    nd = x.ndim - 2
    x = ConvNormAct(self.width, self.stem_kernel, self.stem_stride, dtype=self.dtype)(x, train)
    if self.stem_pool:
      x = nn.max_pool(x, (3,) * nd, (2,) * nd, padding="SAME")
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = block_cls(self.width * 2**i, strides=2 if (i > 0 and j == 0) else 1,
                      dtype=self.dtype, zero_init_residual=self.zero_init_residual)(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, nd + 1)))


ResNet18 = registry.register("models.resnet18")(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)))
ResNet34 = registry.register("models.resnet34")(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)))
ResNet50 = registry.register("models.resnet50")(
    functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"))
# Tiny variant for tests only.
ResNetTiny = registry.register("models.resnet_tiny")(
    functools.partial(ResNet, stage_sizes=(1, 1), width=8))
