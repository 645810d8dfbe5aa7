"""ResNet classifiers (18/34/50) for 2-D and 3-D images from one linen module.

The spatial rank comes from the input (``[B, H, W, C]`` or ``[B, D, H, W, C]``), so the same
parameters names serve both; the kernel shapes differ. ``stem="small"`` is the 3×3, stride-1,
no-max-pool stem used for MedMNIST's 28-pixel images (as MedMNIST's and MONAI's small-input
ResNets do); ``stem="imagenet"`` is the classic 7×7/2 conv plus 3×3/2 max-pool.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax import registry
from medjax.models.layers import Conv, ConvNormAct


class BasicBlock(nn.Module):
  """Two 3×3 convs with an identity (or 1×1 projection) shortcut."""

  features: int
  strides: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ConvNormAct(self.features, 3, self.strides, dtype=self.dtype)(x, train)
    y = ConvNormAct(self.features, 3, 1, act=None, zero_init_scale=True, dtype=self.dtype)(y, train)
    if x.shape[-1] != self.features or self.strides != 1:
      x = ConvNormAct(self.features, 1, self.strides, act=None, dtype=self.dtype)(x, train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1×1 reduce → 3×3 → 1×1 expand (×4), with a projection shortcut where shapes change."""

  features: int
  strides: int = 1
  dtype: Any = None
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = self.features * self.expansion
    y = ConvNormAct(self.features, 1, 1, dtype=self.dtype)(x, train)
    y = ConvNormAct(self.features, 3, self.strides, dtype=self.dtype)(y, train)
    y = ConvNormAct(out, 1, 1, act=None, zero_init_scale=True, dtype=self.dtype)(y, train)
    if x.shape[-1] != out or self.strides != 1:
      x = ConvNormAct(out, 1, self.strides, act=None, dtype=self.dtype)(x, train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet over 2-D or 3-D inputs.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block: ``"basic"`` or ``"bottleneck"``.
    num_classes: width of the logits.
    width: channels of the first stage (doubled at each later stage).
    stem: ``"small"`` (3×3/1, no pool) or ``"imagenet"`` (7×7/2 + max-pool 3×3/2).
    dropout: dropout rate before the head.
    dtype: compute dtype (``None`` keeps the input's); parameters stay float32.
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  num_classes: int = 2
  width: int = 64
  stem: str = "small"
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Args: x: ``[B, *spatial, C]`` float. Returns: logits ``[B, num_classes]`` (and the pooled
    ``[B, F]`` features when ``return_features``)."""
    if x.ndim not in (4, 5):
      raise ValueError(f"ResNet expects [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}")
    nd = x.ndim - 2
    if self.stem == "small":
      x = ConvNormAct(self.width, 3, 1, dtype=self.dtype)(x, train)
    elif self.stem == "imagenet":
      x = ConvNormAct(self.width, 7, 2, dtype=self.dtype)(x, train)
      x = nn.max_pool(x, (3,) * nd, (2,) * nd, padding="SAME")
    else:
      raise ValueError(f"unknown stem {self.stem!r} (small|imagenet)")
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = block_cls(self.width * 2**i, strides=2 if (i > 0 and j == 0) else 1,
                      dtype=self.dtype)(x, train)
    features = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, nd + 1)))
    h = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32)(h)
    return (logits, features) if return_features else logits


ResNet18 = registry.register("models.resnet18")(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)))
ResNet34 = registry.register("models.resnet34")(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)))
ResNet50 = registry.register("models.resnet50")(
    functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"))
# Tiny variant for tests only.
ResNetTiny = registry.register("models.resnet_tiny")(
    functools.partial(ResNet, stage_sizes=(1, 1), width=8))
