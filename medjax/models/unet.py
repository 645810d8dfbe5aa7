"""U-Net for 2-D and 3-D segmentation, shaped like nnU-Net's ``PlainConvUNet`` (MONAI ``DynUNet``).

Per-voxel logits ``[B, *spatial, num_classes]`` from ``[B, *spatial, C]``; the spatial rank comes
from the input, as in ``resnet.py``. Down-sampling is by the first (strided) conv of each stage,
no pooling; per-stage strides may be anisotropic (``(1, 2, 2)``), as nnU-Net plans them.

Any spatial size works: a stride-``s`` stage outputs ``ceil(n / s)`` voxels (``SAME`` padding), and
the decoder crops its up-sampled maps to the skip's size. Sizes divisible by the total stride (what
nnU-Net's patch sizes and the sliding window give) are the exact case: no voxel is cropped.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medjax import registry
from medjax.models import conv_lowering, norm_act
from medjax.models.layers import Conv

NORMS = ("instance", "group", "batch")

# Benchmarks' A/B switch: False builds every up-sampled map instead of folding it into the
# convolution that reads it (`PendingUpsample`).
FOLD_UPSAMPLING = True
# Up-sampled maps smaller than this per image are built: they stay in the CPU's caches, so
# folding saves little memory traffic and costs a composite kernel per call. (Per image, not per
# batch: exported models have a symbolic batch size.)
FOLD_MIN_BYTES = 1 << 20
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
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(self.features, 3, self.strides, dtype=self.dtype,
             kernel_init=_he_init(self.negative_slope))(x)
    if self.norm == "instance":
      # Named as flax's InstanceNorm was: checkpoints keep their parameter paths.
      return InstanceNormLeakyReLU(self.negative_slope, dtype=self.dtype, name="InstanceNorm_0")(x)
    x = _norm(self.norm, self.features, self.norm_groups, train, self.dtype)(x)
    return nn.leaky_relu(x, self.negative_slope)


class InstanceNormLeakyReLU(nn.Module):
  """Instance norm (eps 1e-5, a scale and a bias per channel, as flax's ``InstanceNorm``) and a
  leaky ReLU as one step: ``norm_act`` fuses the pair on CPUs (4.4× faster than XLA's passes)."""

  negative_slope: float = 0.01
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    # Statistics in float32 whatever the dtype, as flax computes them.
    y = norm_act.instance_norm_leaky_relu(x.astype(jnp.float32), scale, bias, self.epsilon,
                                          self.negative_slope)
    return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class PendingUpsample:
  """`UpTranspose`'s output before it is computed, so that the convolution reading it folds it in.

  A kernel = stride transposed convolution (kernel ``U``, bias ``b``) followed by a stride-1,
  ``SAME`` convolution (odd kernel ``W``) is one linear map of the low-resolution input plus a
  fixed map: a transposed convolution by the composite kernel ``U ∘ W`` (``s + k - 1`` taps per
  axis, stride ``s``), plus ``b`` convolved by ``W`` (constant inside, different only within
  ``k // 2`` voxels of the border). In the U-Net decoder, ``conv(concat(up, skip), W)`` becomes
  ``conv(skip, W_skip) + conv_transpose(x, U ∘ W_up) + map``: the up-sampled map and the
  concatenation are never built, and fewer multiply-adds remain (stride 2, 3×3×3, per output
  voxel: 8·C·F + 27·F² instead of C·F + 54·F², with C the low-resolution channels, F the skip's
  and the output's). Results equal the unfolded ones up to float rounding
  (``tests/models/test_unet.py``).

  It pays on the CPU, where oneDNN runs the convolutions, and where the up-sampled map is large
  (`FOLD_MIN_BYTES`); elsewhere the map is built. There oneDNN's transposed convolution and the
  two smaller convolutions run at a lower share of the CPU's peak than the one concatenated
  convolution, and the composite kernel is recomputed at every call, so the gain is the memory
  traffic saved. The MSD Hippocampus U-Net (16–128 channels) on 2 cores, its first two decoder
  stages folded (folding the third too was slower): forward on 4 windows of 40×56×40 6 % faster
  (median of 30 paired runs, quartiles 2 % and 10 %); train step with deep supervision, batch 4,
  the Winograd convolutions: 1.32 vs 1.41 s (medians of 6 rounds, per-round ratios 0.96–1.22).
  On a GPU (one H100, cuDNN through XLA) the fold made the train step (no deep supervision)
  3.1× slower, 22.8 vs 7.3 ms, so it is not done there.
  """

  x: jax.Array       # [B, *low, C]
  kernel: jax.Array  # [*strides, C, F], PyTorch's ConvTranspose layout (unflipped)
  bias: jax.Array    # [F]
  strides: tuple[int, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.x.shape[0], *(n * s for n, s in zip(self.x.shape[1:-1], self.strides)),
            self.kernel.shape[-1])

  @property
  def dtype(self) -> Any:
    return self.x.dtype

  def materialize(self) -> jax.Array:
    """The up-sampled map ``[B, *(low · strides), F]``.

    With kernel = stride the output blocks do not overlap: input voxel ``i`` alone fills output
    voxels ``s * i + k``, each as ``x[i] @ kernel[k]``. That is one matmul and a depth-to-space
    reshape, exact for any rank and backend, with no convolution to lower.
    """
    x, nd = self.x, self.x.ndim - 2
    y = jnp.tensordot(x, self.kernel.astype(x.dtype), axes=[[x.ndim - 1], [nd]])
    # [B, *X, *s, F] → [B, X1, s1, X2, s2, ..., F] → [B, X1·s1, X2·s2, ..., F]
    perm = (0, *(a for i in range(nd) for a in (1 + i, 1 + nd + i)), 1 + 2 * nd)
    return y.transpose(perm).reshape(self.shape) + self.bias.astype(x.dtype)

  def convolve(self, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
    """``conv(self.materialize(), kernel, strides, padding)``, folded where it can be."""
    taps = kernel.shape[:-2]
    if (any(s != 1 for s in strides) or padding != "SAME" or any(k % 2 == 0 for k in taps)
        or math.prod(self.shape[1:]) * jnp.dtype(self.dtype).itemsize < FOLD_MIN_BYTES
        or not conv_lowering.runs_on_onednn(self.x, kernel)):
      return conv_lowering.conv(self.materialize(), kernel, strides, padding)
    nd = self.x.ndim - 2
    # Axis by axis, composite tap t takes up-sampling phase a through conv tap w = a - t + 2p
    # (p = k // 2): output voxel n = s·j + t - p reads up-sampled voxel n + w - p = s·j + a.
    selections, subscripts = [], []
    for d, (s, k) in enumerate(zip(self.strides, taps)):
      p = k // 2
      select = np.zeros((s + 2 * p, s, k), np.float32)
      for t, a in itertools.product(range(s + 2 * p), range(s)):
        if 0 <= a - t + 2 * p < k:
          select[t, a, a - t + 2 * p] = 1
      selections += [select, [d, nd + d, 2 * nd + d]]
      subscripts.append(d)
    c, m, f = 3 * nd, 3 * nd + 1, 3 * nd + 2  # low channels, up-sampled channels, output channels
    composite = jnp.einsum(*selections, self.kernel, [*range(nd, 2 * nd), c, m],
                           kernel.astype(jnp.float32), [*range(2 * nd, 3 * nd), m, f],
                           [*subscripts, f, c])
    full = self.shape[:-1] + (kernel.shape[-1],)
    pads = [(k // 2, k // 2) for k in taps]
    y = conv_lowering.conv_transpose(self.x, composite.astype(self.dtype), self.strides, pads,
                                     full)
    # The bias's share: constant but within k // 2 voxels of a border, so it is convolved on a
    # box of 2p + 1 voxels per axis (the border rows and one inner row) and the inner row repeated.
    box = [min(n, k) for n, k in zip(full[1:-1], taps)]
    bias_box = jnp.broadcast_to(self.bias.astype(self.dtype), (1, *box, self.kernel.shape[-1]))
    bias = conv_lowering.conv(bias_box, kernel, (1,) * nd, "SAME")[0]
    for axis, (n, b, k) in enumerate(zip(full[1:-1], box, taps)):
      if n > b:  # concatenated, not jnp.repeat: XLA:CPU fuses that into its consumers as a gather
        p = k // 2
        inner = lax.slice_in_dim(bias, p, p + 1, axis=axis)
        inner = jnp.broadcast_to(inner, inner.shape[:axis] + (n - 2 * p,) + inner.shape[axis + 1:])
        bias = jnp.concatenate([lax.slice_in_dim(bias, 0, p, axis=axis), inner,
                                lax.slice_in_dim(bias, p + 1, b, axis=axis)], axis=axis)
    return add_to_every_sample(y, bias)


@jax.custom_vjp
def add_to_every_sample(x: jax.Array, value: jax.Array) -> jax.Array:
  """``x + value``: ``value`` (``x.shape[1:]``) added to each sample of the batch ``x``.

  Its gradient in ``value`` sums the batch as a product with ones rather than a reduction over the
  leading axis: XLA:CPU gives that reduction to YNNPACK, which took 180 ms of the Hippocampus
  U-Net's train step for one ``[4, 40, 56, 40, 16]`` map on 2 cores (5 ms as a product, also a
  plain contraction for a batch sharded over devices).
  """
  return x + value


def _add_to_every_sample_fwd(x, value):
  return x + value, None


def _add_to_every_sample_bwd(_, g):
  return g, jnp.tensordot(jnp.ones(g.shape[0], g.dtype), g, axes=1)


add_to_every_sample.defvjp(_add_to_every_sample_fwd, _add_to_every_sample_bwd)


class UpTranspose(nn.Module):
  """Transposed convolution with kernel size = stride (nnU-Net's decoder up-sampling).

  The kernel is ``[*strides, C_in, features]`` and unflipped, PyTorch's ``ConvTranspose``
  convention (flax's ``nn.ConvTranspose`` computes the same with the kernel flipped).
  ``pending=True`` returns a `PendingUpsample`, for a following convolution to fold in.
  """

  features: int
  strides: Sequence[int]
  negative_slope: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, pending: bool = False) -> jax.Array | PendingUpsample:
    nd = x.ndim - 2
    s = tuple(self.strides)
    # Fan-in is C_in: the stride axes index separate outputs, not summed inputs.
    init = _he_init(self.negative_slope, batch_axis=range(nd))
    kernel = self.param("kernel", init, s + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    up = PendingUpsample(x.astype(self.dtype), kernel, bias, s)
    return up if pending else up.materialize()


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
    nd = x.ndim - 2
    strides = self.stage_strides(nd)
    block = functools.partial(ConvBlock, norm=self.norm, norm_groups=self.norm_groups,
                              negative_slope=self.negative_slope, dtype=self.dtype)

    skips = []
    for i, (f, s) in enumerate(zip(self.features, strides)):
      for j in range(self.convs_per_stage):
        x = block(f, s if j == 0 else 1, name=f"enc{i}_{j}")(x, train)
      skips.append(x)

    outputs = []
    x = skips.pop()
    # The pooled bottleneck is the encoder's embedding (medjax.infer.features exports it).
    self.sow("intermediates", "embedding",
             jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1))))
    for i in reversed(range(len(skips))):
      skip, f = skips[i], self.features[i]
      if self.upsample == "transpose":
        x = UpTranspose(f, strides[i + 1], self.negative_slope, self.dtype, name=f"up{i}")(
            x, pending=True)
        if x.shape[1:-1] != skip.shape[1:-1]:
          # Non-divisible sizes: ceil(n / s) · s ≥ n; the extra voxels lie past the skip's end.
          x = x.materialize()[(slice(None), *(slice(0, n) for n in skip.shape[1:-1]))]
        elif not FOLD_UPSAMPLING:
          x = x.materialize()
      else:
        # A 1×1 conv commutes with interpolation (both linear, weights sum to 1), so it runs at
        # the low resolution, where it is cheaper.
        x = Conv(f, 1, dtype=self.dtype, kernel_init=_he_init(self.negative_slope),
                 name=f"up{i}")(x)
        x = jax.image.resize(x, x.shape[:1] + skip.shape[1:-1] + x.shape[-1:], "linear")
      # Concatenated along the channels by the first convolution, which folds a pending
      # up-sampling in (`PendingUpsample`).
      x = [x, skip.astype(self.dtype)]
      for j in range(self.convs_per_stage):
        x = block(f, name=f"dec{i}_{j}")(x, train)
      if self.deep_supervision or i == 0:
        head = Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, name=f"head{i}")
        outputs.append(head(x).astype(jnp.float32))
    return outputs[::-1] if self.deep_supervision else outputs[0]
