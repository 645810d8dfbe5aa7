"""U-Net for 2-D and 3-D segmentation, shaped like nnU-Net's ``PlainConvUNet`` (MONAI ``DynUNet``).

Per-voxel logits ``[B, *spatial, num_classes]`` from ``[B, *spatial, C]``; the spatial rank comes
from the input, as in ``resnet.py``. Down-sampling is by the first (strided) conv of each stage,
no pooling; per-stage strides may be anisotropic (``(1, 2, 2)``), as nnU-Net plans them.

Any spatial size works: a stride-``s`` stage outputs ``ceil(n / s)`` voxels (``SAME`` padding), and
the decoder crops its up-sampled maps to the skip's size. Sizes divisible by the total stride (what
nnU-Net's patch sizes and the sliding window give) are the exact case: no voxel is cropped.

Multi-modal input (one channel per modality) is fused early (channels stacked, the default), late
(one encoder per modality, every level fused) or by gates (`medjax.models.fusion`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax import ops, registry
from medjax.models import fusion as fusion_lib
from medjax.models.layers import Conv

NORMS = ("instance", "group", "batch")
UPSAMPLES = ("transpose", "resize")


def _he_init(negative_slope: float, batch_axis: Sequence[int] = ()):
  """He-normal over fan-in for a leaky ReLU: nnU-Net's ``InitWeights_He(1e-2)``."""
  return nn.initializers.variance_scaling(2.0 / (1.0 + negative_slope**2), "fan_in", "normal",
                                          batch_axis=tuple(batch_axis))


def _norm(kind: str, features: int, groups: int, train: bool, dtype: Any) -> nn.Module:
  # eps 1e-5 throughout: nnU-Net's (PyTorch's) default for all three norms. (Instance norm is
  # `InstanceNormLeakyReLU`.)
  if kind == "group":
    return nn.GroupNorm(num_groups=math.gcd(features, groups), epsilon=1e-5, dtype=dtype)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvBlock(nn.Module):
  """3ⁿ conv → norm → leaky ReLU, the unit every U-Net stage repeats.

  ``layers.ConvNormAct`` is BatchNorm-only; U-Nets default to instance norm, so the norm is chosen
  here while the convolution stays ``layers.Conv``.
  """

  features: int
  strides: int | Sequence[int] = 1
  norm: str = "instance"
  norm_groups: int = 32
  negative_slope: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, skip: jax.Array | None = None,
               up: UpTranspose | None = None) -> jax.Array:
    """Args: x: ``[B, *spatial, C]``; train: batch statistics (``norm="batch"``); skip: a
    decoder's skip connection, concatenated after ``x`` (its channels last) before the convolution;
    up: with ``skip``, the up-sampling that ``x`` goes through first (``x`` is then the lower
    resolution's map): up-sampling, concatenation and convolution run as one op,
    ``ops.upsample_concat_conv``, which a backend may fuse."""
    conv = Conv(self.features, 3, self.strides, dtype=self.dtype,
                kernel_init=_he_init(self.negative_slope))
    if up is not None:
      up_kernel, up_bias = up.weights(x.shape[-1], x.ndim - 2)
      kernel, _ = conv.weights(up.features + skip.shape[-1], x.ndim - 2)
      x = ops.upsample_concat_conv(x.astype(self.dtype), up_kernel.astype(self.dtype),
                                   up_bias.astype(self.dtype), skip.astype(self.dtype),
                                   kernel.astype(self.dtype))
    else:
      x = conv(x if skip is None else jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))
    if self.norm == "instance":
      # Named as flax's InstanceNorm was: checkpoints keep their parameter paths.
      return InstanceNormLeakyReLU(self.negative_slope, dtype=self.dtype, name="InstanceNorm_0")(x)
    x = _norm(self.norm, self.features, self.norm_groups, train, self.dtype)(x)
    return nn.leaky_relu(x, self.negative_slope)


class InstanceNormLeakyReLU(nn.Module):
  """Instance norm (eps 1e-5, a scale and a bias per channel, as flax's ``InstanceNorm``) and a
  leaky ReLU as one op (``medjax.ops.instance_norm_leaky_relu``), which a backend may fuse."""

  negative_slope: float = 0.01
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    # Statistics in float32 whatever the dtype, as flax computes them.
    y = ops.instance_norm_leaky_relu(x.astype(jnp.float32), scale, bias, self.epsilon,
                                     self.negative_slope)
    return y.astype(self.dtype)


class UpTranspose(nn.Module):
  """Transposed convolution with kernel size = stride (nnU-Net's decoder up-sampling).

  The kernel is ``[*strides, C_in, features]`` and unflipped, PyTorch's ``ConvTranspose``
  convention (flax's ``nn.ConvTranspose`` computes the same with the kernel flipped).
  """

  features: int
  strides: Sequence[int]
  negative_slope: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def weights(self, in_features: int, nd: int) -> tuple[jax.Array, jax.Array]:
    """The kernel ``[*strides, in_features, features]`` and the bias ``[features]``, float32."""
    # Fan-in is C_in: the stride axes index separate outputs, not summed inputs.
    init = _he_init(self.negative_slope, batch_axis=range(nd))
    kernel = self.param("kernel", init, tuple(self.strides) + (in_features, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return kernel, bias

  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: ``[B, *X, C]``. Returns: ``[B, *(X · strides), features]``."""
    kernel, bias = self.weights(x.shape[-1], x.ndim - 2)
    return ops.upsample(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


def _encode(x: jax.Array, train: bool, block: Any, features: Sequence[int],
            strides: Sequence[tuple[int, ...]], convs_per_stage: int) -> list[jax.Array]:
  """The encoder: ``convs_per_stage`` blocks per stage, named ``enc<stage>_<conv>`` in the module
  whose compact method calls it. Returns each stage's output, highest resolution first."""
  skips = []
  for i, (f, s) in enumerate(zip(features, strides)):
    for j in range(convs_per_stage):
      x = block(f, s if j == 0 else 1, name=f"enc{i}_{j}")(x, train)
    skips.append(x)
  return skips


class Encoder(nn.Module):
  """The U-Net encoder of one modality (late and gated fusion); same blocks as the U-Net's own.

  Attributes:
    features, convs_per_stage, norm, norm_groups, negative_slope, dtype: as `UNet`'s.
    strides: per-stage strides, already one per spatial axis (`UNet.stage_strides`).
  """

  features: Sequence[int]
  strides: Sequence[Sequence[int]]
  convs_per_stage: int = 2
  norm: str = "instance"
  norm_groups: int = 32
  negative_slope: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    """Args: x: ``[B, *spatial, C]``. Returns: each stage's ``[B, *spatial_i, features[i]]``."""
    block = functools.partial(ConvBlock, norm=self.norm, norm_groups=self.norm_groups,
                              negative_slope=self.negative_slope, dtype=self.dtype)
    return _encode(x, train, block, self.features, [tuple(s) for s in self.strides],
                   self.convs_per_stage)


@registry.register("models.unet")
class UNet(nn.Module):
  """A plain-conv U-Net over 2-D or 3-D inputs.

  Attributes:
    num_classes: logits per voxel.
    features: channels of each resolution stage, highest resolution first (nnU-Net caps at 320).
    strides: per-stage down-sampling stride, an int or one per spatial axis; the first stage's
      must be 1. ``None``: 1, then 2 on every axis for each later stage.
    convs_per_stage: conv blocks per encoder stage and per decoder stage.
    norm: ``"instance"`` (nnU-Net), ``"group"`` or ``"batch"`` (running statistics in
      ``batch_stats``; the other two keep none).
    norm_groups: groups of ``"group"`` norm, lowered to ``gcd(channels, norm_groups)`` where the
      channels do not divide.
    negative_slope: of the leaky ReLU (nnU-Net: 0.01; 0 is a ReLU).
    upsample: ``"transpose"``: transposed conv, kernel = stride (nnU-Net); ``"resize"``: 1×1 conv
      then linear interpolation (``jax.image.resize``) to the skip's size.
    deep_supervision: return the logits of every decoder stage, ``[full, 1/2, 1/4, ...]`` (all
      but the bottleneck), instead of the full-resolution ones only. Parameter names do not
      depend on it (heads are ``head<level>``), so a model trained with it can be evaluated
      without it from the same parameters.
    fusion: how the input's channels (one per modality) meet: ``"early"``, stacked at the input
      (one encoder ``enc<i>_<j>``); ``"late"``, one `Encoder` per modality (``modality<m>``) and
      each level's features fused by concatenation and a 1×1 conv (``fuse<i>``) before the
      decoder; ``"gated"``, the same with learned per-modality gates (``fuse<i>``, Chen et al.
      2019; gates sown as ``intermediates/fuse<i>/gates``). See `medjax.models.fusion`.
    dtype: compute dtype; parameters and the returned logits are float32.
  """

  num_classes: int
  features: Sequence[int] = (32, 64, 128, 256, 320)
  strides: Sequence[int | Sequence[int]] | None = None
  convs_per_stage: int = 2
  norm: str = "instance"
  norm_groups: int = 32
  negative_slope: float = 0.01
  upsample: str = "transpose"
  deep_supervision: bool = False
  fusion: str = "early"
  dtype: Any = jnp.float32

  def stage_strides(self, nd: int) -> list[tuple[int, ...]]:
    """Per-stage strides as ``nd``-tuples; raises ``ValueError`` on a malformed ``strides``."""
    n = len(self.features)
    raw = [1] + [2] * (n - 1) if self.strides is None else list(self.strides)
    if len(raw) != n:
      raise ValueError(f"strides has {len(raw)} entries for {n} stages (features={self.features})")
    out = []
    for s in raw:
      s = (s,) * nd if isinstance(s, int) else tuple(s)
      if len(s) != nd or any(k < 1 for k in s):
        raise ValueError(f"stride {s} does not fit a {nd}-D input (strides={self.strides})")
      out.append(s)
    if any(k != 1 for k in out[0]):
      raise ValueError(f"the first stage's stride must be 1 (full resolution), got {out[0]}")
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    """Args: x: ``[B, *spatial, C]`` float; train: batch statistics (``norm="batch"`` only).

    Returns: logits ``[B, *spatial, num_classes]`` float32, or with ``deep_supervision`` a list of
    them, one per decoder stage, highest resolution first.
    """
    if x.ndim not in (4, 5):
      raise ValueError(f"UNet expects [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.upsample not in UPSAMPLES:
      raise ValueError(f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}")
    if len(self.features) < 2:
      raise ValueError(f"a U-Net needs at least 2 stages, got features={self.features}")
    fusion_lib.check_fusion(self.fusion)
    nd = x.ndim - 2
    strides = self.stage_strides(nd)
    block = functools.partial(ConvBlock, norm=self.norm, norm_groups=self.norm_groups,
                              negative_slope=self.negative_slope, dtype=self.dtype)

    if self.fusion == "early":
      skips = _encode(x, train, block, self.features, strides, self.convs_per_stage)
    else:
      per_modality = [
          Encoder(self.features, strides, self.convs_per_stage, self.norm, self.norm_groups,
                  self.negative_slope, self.dtype, name=f"modality{m}")(xm, train)
          for m, xm in enumerate(fusion_lib.split_modalities(x))]
      skips = [fusion_lib.fusion_block(self.fusion, f, self.dtype, name=f"fuse{i}")(
          [stages[i] for stages in per_modality]) for i, f in enumerate(self.features)]

    outputs = []
    x = skips.pop()
    # The pooled bottleneck is the encoder's embedding (medjax.infer.features exports it).
    self.sow("intermediates", "embedding",
             jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1))))
    for i in reversed(range(len(skips))):
      skip, f = skips[i], self.features[i]
      if self.upsample == "transpose":
        up = UpTranspose(f, strides[i + 1], self.negative_slope, self.dtype, name=f"up{i}")
      else:
        up = None
        # A 1×1 conv commutes with interpolation (both linear, weights sum to 1), so it runs at
        # the low resolution, where it is cheaper.
        x = Conv(f, 1, dtype=self.dtype, kernel_init=_he_init(self.negative_slope),
                 name=f"up{i}")(x)
        x = jax.image.resize(x, x.shape[:1] + skip.shape[1:-1] + x.shape[-1:], "linear")
      # The first block up-samples x (transpose), concatenates the skip and convolves.
      x = block(f, name=f"dec{i}_0")(x, train, skip=skip, up=up)
      for j in range(1, self.convs_per_stage):
        x = block(f, name=f"dec{i}_{j}")(x, train)
      if self.deep_supervision or i == 0:
        head = Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, name=f"head{i}")
        outputs.append(head(x).astype(jnp.float32))
    return outputs[::-1] if self.deep_supervision else outputs[0]
