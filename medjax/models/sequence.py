"""Volumes read as sequences of 2-D slices: a shared per-slice encoder, then an RNN over slices.

``SliceSequenceClassifier`` folds the slices of ``[B, D, H, W, C]`` into the batch, encodes each
with one 2-D network (``small_cnn`` or a headless ResNet), runs stacked (bi)directional LSTM/GRU/
simple RNN layers along the slice axis and pools over slices (last state, masked mean or masked
attention) before a Dense head. ``SlicesAsChannels`` is the 2.5-D baseline: the slices become the
channels of one 2-D ResNet. Both take ``(x, train)`` like ``ResNet``, so the classification task
and the one training loop run them unchanged.

Variable-length volumes pass ``seq_lengths`` (valid slices along ``slice_axis``, counted before
striding, each >= 1): slices beyond it change nothing in evaluation. In training, BatchNorm's
batch statistics in the encoder still see the padding slices (``ConvNormAct`` has no mask), so
train on unpadded volumes (MedMNIST volumes all have the same length; the loop passes none).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax import registry
from medjax.models import resnet
from medjax.models.layers import ConvNormAct

# Axis of ``[B, D, H, W, C]`` that each slice orientation steps along, naming D (depth first, as
# MedMNIST3D arrays come) axial. A ``Volume`` read from NIfTI/DICOM is ``[i, j, k]`` in RAS+, so
# its axial axis k is axis 3 here, which these names call "sagittal": check the data's layout.
SLICE_AXES = {"axial": 1, "coronal": 2, "sagittal": 3}
# OptimizedLSTMCell: LSTMCell's equations and parameter names, its four gates computed by one fused
# matmul per input instead of eight small ones (benchmarks/sequence_step_vs_torch.py).
CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "simple": nn.SimpleCell}
POOLINGS = ("last", "mean", "attention")


def _check_choice(field: str, value: str, options) -> None:
  if value not in options:
    raise ValueError(f"{field}={value!r}; expected one of {sorted(options)}")


def slices_first(x: jax.Array, slice_axis: str, slice_stride: int = 1) -> jax.Array:
  """Moves the ``slice_axis`` of ``[B, D, H, W, C]`` to axis 1 and keeps every ``slice_stride``-th
  slice. Returns: ``[B, T, h, w, C]`` with ``T = ceil(len / slice_stride)``."""
  if x.ndim != 5:
    raise ValueError(f"expected a volume batch [B, D, H, W, C], got shape {x.shape}")
  _check_choice("slice_axis", slice_axis, SLICE_AXES)
  if slice_stride < 1:
    raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
  return jnp.moveaxis(x, SLICE_AXES[slice_axis], 1)[:, ::slice_stride]


def with_neighbours(x: jax.Array, context: int, seq_lengths: jax.Array | None = None) -> jax.Array:
  """Gives each slice of ``x [B, T, H, W, C]`` its ``context`` neighbours on each side as extra
  channels: ``[B, T, H, W, (2 * context + 1) * C]``, ordered from slice ``t - context`` to
  ``t + context``. Neighbours outside the volume, or at or beyond ``seq_lengths``, are zeros, so
  padding slices still change nothing."""
  if context < 0:
    raise ValueError(f"context must be >= 0, got {context}")
  if not context:
    return x
  t = x.shape[1]
  if seq_lengths is not None:
    valid = jnp.arange(t)[None, :] < jnp.asarray(seq_lengths, jnp.int32)[:, None]
    x = jnp.where(valid[:, :, None, None, None], x, 0)
  padded = jnp.pad(x, ((0, 0), (context, context)) + ((0, 0),) * (x.ndim - 2))
  return jnp.concatenate([padded[:, k:k + t] for k in range(2 * context + 1)], axis=-1)


def slice_mask(num_slices: int, seq_lengths: jax.Array | None, slice_stride: int = 1):
  """``([B, T] bool mask or None, strided lengths [B] or None)`` for ``seq_lengths`` counted in
  input slices: slice ``t`` of the strided sequence is input slice ``t * slice_stride``."""
  if seq_lengths is None:
    return None, None
  lengths = (jnp.asarray(seq_lengths, jnp.int32) + slice_stride - 1) // slice_stride
  return jnp.arange(num_slices)[None, :] < lengths[:, None], lengths


@registry.register("models.small_cnn")
class SmallCNN(nn.Module):
  """A small VGG-style CNN (2-D or 3-D): per stage a strided ``ConvNormAct`` and a plain one, then
  a global mean. Meant as a cheap per-slice encoder (``num_classes=0``).

  Attributes:
    features: channels per stage; every stage after the first halves the resolution.
    stem_stride: stride of the first convolution.
    norm: ``"batch"`` or ``"group"`` (see ``ConvNormAct``).
    num_classes: width of the logits; 0 returns the pooled ``[B, features[-1]]`` features.
    dropout: dropout rate before the head (unused when ``num_classes=0``).
    dtype: compute dtype (``None`` keeps the input's); parameters stay float32.
  """

  features: Sequence[int] = (16, 32, 64)
  stem_stride: int = 1
  norm: str = "batch"
  num_classes: int = 0
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x: ``[B, *spatial, C]``. Returns: ``[B, num_classes]`` logits, or ``[B, F]``."""
    for i, f in enumerate(self.features):
      x = ConvNormAct(f, 3, self.stem_stride if i == 0 else 2, norm=self.norm,
                      dtype=self.dtype)(x, train)
      x = ConvNormAct(f, 3, 1, norm=self.norm, dtype=self.dtype)(x, train)
    features = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))
    if self.num_classes == 0:
      return features
    h = nn.Dropout(self.dropout, deterministic=not train)(features)
    return nn.Dense(self.num_classes, dtype=jnp.float32)(h)


class SliceSequenceClassifier(nn.Module):
  """Per-slice 2-D encoder (shared weights) → stacked RNN over slices → slice pooling → Dense.

  Parameters: ``encoder`` (the 2-D network), ``rnn_{i}`` (``nn.RNN``, or ``nn.Bidirectional``
  with ``forward_rnn``/``backward_rnn``, each holding its ``cell``), ``attention_hidden`` and
  ``attention_score`` (attention pooling only) and ``head``.

  Attributes:
    num_classes: width of the logits.
    slice_axis: ``"axial"`` (D, axis 1 of ``[B, D, H, W, C]``), ``"coronal"`` (H) or
      ``"sagittal"`` (W): the axis the RNN steps along.
    slice_stride: keep every k-th slice (cheaper; thin CT slices are highly redundant).
    context: neighbouring slices on each side given to the encoder as extra channels (a thin
      slab per step, as 2.5-D models read; 0: the slice alone). Taken before striding.
    encoder: a ``models.`` registry spec called with ``num_classes=0``, e.g. ``"small_cnn"`` or
      ``"resnet18(width=32, stem_stride=2)"``; it must return pooled ``[N, F]`` features.
    cell: ``"lstm"``, ``"gru"`` or ``"simple"`` (flax's ``LSTMCell``/``GRUCell``/``SimpleCell``).
    hidden: RNN state size per direction.
    num_layers: stacked RNN layers; each reads the previous one's per-slice outputs.
    bidirectional: add a backward RNN per layer; outputs are ``[forward, backward]``.
    pooling: ``"last"`` (forward state at the last valid slice, plus the backward state at the
      first slice when bidirectional), ``"mean"`` (masked mean) or ``"attention"`` (masked
      softmax over slices; the ``[B, T]`` weights, T the slices kept after striding, are sown
      as ``intermediates/slice_attention``).
    dropout: rate between stacked RNN layers and before the head.
    dtype: the encoder's compute dtype; the RNN, pooling and head run in float32.
  """

  num_classes: int = 2
  slice_axis: str = "axial"
  slice_stride: int = 1
  context: int = 0
  encoder: str = "small_cnn"
  cell: str = "lstm"
  hidden: int = 128
  num_layers: int = 1
  bidirectional: bool = True
  pooling: str = "attention"
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               seq_lengths: jax.Array | None = None) -> jax.Array:
    """Args:
      x: ``[B, D, H, W, C]`` float volumes.
      train: batch statistics and dropout on.
      seq_lengths: optional ``[B]`` int, valid slices along ``slice_axis`` (before striding,
        >= 1); later slices are padding and ignored.

    Returns: logits ``[B, num_classes]``.
    """
    _check_choice("cell", self.cell, CELLS)
    _check_choice("pooling", self.pooling, POOLINGS)
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    x = slices_first(x, self.slice_axis)
    x = with_neighbours(x, self.context, seq_lengths)[:, ::self.slice_stride]
    b, t = x.shape[:2]
    mask, lengths = slice_mask(t, seq_lengths, self.slice_stride)

    # Slices folded into the batch: one encoder call, shared weights, batch-norm over all slices.
    encoder = registry.lookup(self.encoder, "models.")(num_classes=0, dtype=self.dtype,
                                                       name="encoder")
    feats = encoder(x.reshape((b * t,) + x.shape[2:]), train)
    if feats.ndim != 2:
      raise ValueError(f"encoder {self.encoder!r} returned shape {feats.shape}; a slice encoder "
                       "must return pooled [N, F] features when built with num_classes=0")
    h = feats.reshape(b, t, -1).astype(jnp.float32)

    for i in range(self.num_layers):
      if i:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
      # parent=None: each module is adopted by the one it is handed to, so the parameters nest
      # as rnn_{i}/cell or rnn_{i}/{forward,backward}_rnn/cell instead of flat cells up here.
      make = lambda **kw: nn.RNN(CELLS[self.cell](self.hidden, parent=None), **kw)
      # The backward RNN flips only the first seq_lengths slices, so it starts at the last valid
      # slice and its output at slice 0 has read them all; keep_order puts outputs back in place.
      rnn = (nn.Bidirectional(make(parent=None), make(parent=None), name=f"rnn_{i}")
             if self.bidirectional else make(name=f"rnn_{i}"))
      h = rnn(h, seq_lengths=lengths)
    if mask is not None:
      # Padding outputs are finite but meaningless; zero them so no pooling can pick them up.
      h = jnp.where(mask[..., None], h, 0.0)

    if self.pooling == "last":
      last = (lengths - 1) if lengths is not None else jnp.full((b,), t - 1)
      forward = h[..., :self.hidden]
      pooled = jnp.take_along_axis(forward, last[:, None, None], axis=1)[:, 0]
      if self.bidirectional:
        pooled = jnp.concatenate([pooled, h[:, 0, self.hidden:]], axis=-1)
    elif self.pooling == "mean":
      if mask is None:
        pooled = jnp.mean(h, axis=1)
      else:
        pooled = jnp.sum(h, axis=1) / lengths[:, None].astype(h.dtype)
    else:
      e = jnp.tanh(nn.Dense(self.hidden, name="attention_hidden")(h))
      # No bias: softmax ignores a shift shared by all slices, so its gradient is exactly 0 and
      # Adam would turn the summation noise in it into lr-sized random steps.
      scores = nn.Dense(1, use_bias=False, name="attention_score")(e)[..., 0]  # [B, T]
      if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)  # exp(-inf) = 0: padding gets no weight
      weights = jax.nn.softmax(scores, axis=-1)
      self.sow("intermediates", "slice_attention", weights)
      pooled = jnp.einsum("bt,btf->bf", weights, h)

    self.sow("intermediates", "embedding", pooled)  # exported by medjax.infer.features
    pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)


SliceLSTM = registry.register("models.slice_lstm")(
    functools.partial(SliceSequenceClassifier, cell="lstm"))
SliceGRU = registry.register("models.slice_gru")(
    functools.partial(SliceSequenceClassifier, cell="gru"))
SliceRNN = registry.register("models.slice_rnn")(
    functools.partial(SliceSequenceClassifier, cell="simple"))


class SlicesAsChannels(nn.Module):
  """2.5-D baseline: the slices along ``slice_axis`` become the channels of a 2-D ``backbone``.

  Input channel ``t * C + c`` is channel ``c`` of (strided) slice ``t``, so the first convolution
  mixes all slices at once and nothing models their order beyond that.

  Attributes:
    backbone: a 2-D classifier called as ``backbone(x [B, h, w, T*C], train)``.
    slice_axis: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (see ``SliceSequenceClassifier``).
    slice_stride: keep every k-th slice.
  """

  backbone: nn.Module
  slice_axis: str = "axial"
  slice_stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               seq_lengths: jax.Array | None = None) -> jax.Array:
    """Args: x: ``[B, D, H, W, C]``; seq_lengths: optional ``[B]`` valid slices (padding slices
    are zeroed, so their content changes nothing). Returns: the backbone's logits."""
    x = slices_first(x, self.slice_axis, self.slice_stride)
    b, t, h, w, c = x.shape
    mask, _ = slice_mask(t, seq_lengths, self.slice_stride)
    if mask is not None:
      x = jnp.where(mask[:, :, None, None, None], x, 0.0)
    x = jnp.moveaxis(x, 1, 3).reshape(b, h, w, t * c)
    return self.backbone(x, train)


@registry.register("models.resnet18_2p5d")
def resnet18_2p5d(num_classes: int = 2, slice_axis: str = "axial", slice_stride: int = 1,
                  **resnet_kwargs) -> SlicesAsChannels:
  """A 2-D ResNet-18 over slices-as-channels; ``resnet_kwargs`` are ``ResNet`` fields."""
  return SlicesAsChannels(resnet.ResNet18(num_classes=num_classes, **resnet_kwargs),
                          slice_axis=slice_axis, slice_stride=slice_stride)
