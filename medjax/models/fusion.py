"""Model-level fusion of co-registered modalities: the fusion blocks and modality dropout.

A multi-modal model reads one input channel per modality (``[B, *spatial, M]``, the order of the
dataset's ``dataset.json`` channels). Three ways to combine them, a model's ``fusion`` field:

* ``"early"``: the channels are stacked at the input and the first convolution mixes them (what
  nnU-Net and MONAI do). No block here: the model is the single-modality one.
* ``"late"``: one encoder per modality; their features are concatenated and projected back to
  one feature map by a learned 1×1(×1) convolution (`ConcatFusion`), at every level where the
  model fuses (the U-Net: every skip and the bottleneck; a classifier: the pooled features).
* ``"gated"``: as late, but each modality's features are first weighted by a learned gate in
  [0, 1] computed from all modalities together (`GatedFusion`), the gated fusion of Chen et al.,
  "Robust Multimodal Brain Tumor Segmentation via Feature Disentanglement and Gated Fusion",
  MICCAI 2019 (arXiv:2002.09708). The gates let the model down-weight a modality where it
  carries little (or nothing: a zero-filled missing modality).

`modality_dropout` is the training option that makes a model usable with a modality missing:
each sample loses one modality with probability ``rate``, never all of them.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.layers import Conv

FUSIONS = ("early", "late", "gated")


def check_fusion(fusion: str) -> None:
  """Raises ``ValueError`` unless ``fusion`` is one of `FUSIONS`."""
  if fusion not in FUSIONS:
    raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")


def split_modalities(x: jax.Array) -> list[jax.Array]:
  """``[B, *spatial, M]`` → M arrays ``[B, *spatial, 1]``, one per modality (channel)."""
  return [x[..., m:m + 1] for m in range(x.shape[-1])]


def _project(features: int, kernel_size: int, name: str, dtype: Any, rank: int) -> nn.Module:
  """A linear map over channels: a conv on feature maps, a dense layer on pooled vectors (both
  keep their parameters as ``kernel`` and ``bias`` under ``name``)."""
  if rank == 2:
    return nn.Dense(features, dtype=dtype, name=name)
  return Conv(features, kernel_size, use_bias=True, dtype=dtype, name=name)


class ConcatFusion(nn.Module):
  """Late fusion: concatenate the modalities' features, then a 1×1(×1) conv back to ``features``.

  Attributes:
    features: channels of the fused output.
    dtype: compute dtype (``None``: the inputs').
  """

  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
    """Args: feats: M arrays ``[B, *spatial, F_m]`` (or pooled ``[B, F_m]``).

    Returns: ``[B, *spatial, features]``."""
    x = jnp.concatenate(list(feats), axis=-1)
    return _project(self.features, 1, "proj", self.dtype, x.ndim)(x)


class GatedFusion(nn.Module):
  """Gated fusion (Chen et al., MICCAI 2019): per-modality gates from all modalities' features.

  ``g = sigmoid(conv_k(concat(F_1..F_M)))`` has one channel per modality (a gate per voxel, or
  per sample on pooled features); the fused features are ``conv_1(concat(g_1 F_1, ..., g_M F_M))``.
  The gates are sown as ``intermediates/<name>/gates`` ``[B, *spatial, M]``.

  Attributes:
    features: channels of the fused output.
    gate_kernel: size of the gate's convolution (spatial context of each gate; 3 as in the paper).
    dtype: compute dtype (``None``: the inputs').
  """

  features: int
  gate_kernel: int = 3
  dtype: Any = None

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
    """Args: feats: M arrays ``[B, *spatial, F_m]`` (or pooled ``[B, F_m]``).

    Returns: ``[B, *spatial, features]``."""
    feats = list(feats)
    x = jnp.concatenate(feats, axis=-1)
    logits = _project(len(feats), self.gate_kernel, "gate", self.dtype, x.ndim)(x)
    gates = nn.sigmoid(logits.astype(jnp.float32))
    self.sow("intermediates", "gates", gates)
    gated = [f * gates[..., m:m + 1].astype(f.dtype) for m, f in enumerate(feats)]
    return _project(self.features, 1, "proj", self.dtype, x.ndim)(jnp.concatenate(gated, -1))


def fusion_block(fusion: str, features: int, dtype: Any = None, name: str | None = None
                 ) -> nn.Module:
  """The fusion block of ``fusion`` (``"late"`` or ``"gated"``) with ``features`` outputs."""
  check_fusion(fusion)
  if fusion == "early":
    raise ValueError("early fusion has no fusion block: the channels meet at the first conv")
  cls = ConcatFusion if fusion == "late" else GatedFusion
  return cls(features, dtype=dtype, name=name)


def modality_dropout_keep(rng: jax.Array, batch: int, modalities: int, rate: float) -> jax.Array:
  """Which modalities each sample keeps, ``[batch, modalities]`` bool.

  Each sample, with probability ``rate``, loses one modality drawn uniformly; it never loses
  more than one, and with a single modality it loses none (a model needs some input).
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"modality dropout rate must lie in [0, 1], got {rate}")
  if modalities < 2 or rate == 0.0:
    return jnp.ones((batch, modalities), bool)
  k_drop, k_which = jax.random.split(rng)
  drop = jax.random.bernoulli(k_drop, rate, (batch,))
  which = jax.random.randint(k_which, (batch,), 0, modalities)
  return ~(drop[:, None] & (jnp.arange(modalities)[None, :] == which[:, None]))


def modality_dropout(rng: jax.Array, images: jax.Array, rate: float) -> jax.Array:
  """``images [B, *spatial, M]`` with one modality zeroed per sample with probability ``rate``
  (`modality_dropout_keep`): a zero channel is what inference feeds for a missing modality."""
  keep = modality_dropout_keep(rng, images.shape[0], images.shape[-1], rate)
  shape = (images.shape[0],) + (1,) * (images.ndim - 2) + (images.shape[-1],)
  return images * keep.reshape(shape).astype(images.dtype)
