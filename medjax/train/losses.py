"""Segmentation losses: soft Dice, cross-entropy, their sum (nnU-Net's default) and deep supervision.

Pure ``jnp`` functions, jit-friendly. Logits are ``[N, *spatial, C]`` (channels-last, as the models
emit them); labels are integer class maps ``[N, *spatial]`` or ``[N, *spatial, 1]``. Each loss
returns a float32 scalar. ``mask`` is a per-sample weight ``[N]`` (0 drops a sample, e.g. the
padding of a last evaluation batch). ``ignore_label`` is a label value that marks voxels as not
annotated (nnU-Net's ignore label): they contribute nothing to a loss or its gradient.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.planning.regions import region_targets


def _class_map(labels: jax.Array, logits: jax.Array) -> jax.Array:
  """``labels`` as ``[N, *spatial]`` int32; raises ``ValueError`` if it does not fit ``logits``."""
  if labels.ndim == logits.ndim and labels.shape[-1] == 1:
    labels = labels[..., 0]
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels {labels.shape} do not fit logits {logits.shape}: expected "
                     f"{logits.shape[:-1]} or {logits.shape[:-1] + (1,)}")
  return labels.astype(jnp.int32)


def _sample_weights(mask: jax.Array | None, n: int) -> jax.Array | None:
  if mask is None:
    return None
  mask = jnp.asarray(mask, jnp.float32)
  if mask.shape != (n,):
    raise ValueError(f"mask must be per sample, shape ({n},), got {mask.shape}")
  return mask


def _weighted_mean(x: jax.Array, w: jax.Array | None) -> jax.Array:
  if w is None:
    return jnp.mean(x)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)


def _valid(labels: jax.Array, ignore_label: int | None) -> tuple[jax.Array, jax.Array | None]:
  """``(labels with ignored voxels set to 0, float32 [N, *spatial] 1 where annotated)``; the
  mask is None without an ignore label."""
  if ignore_label is None:
    return labels, None
  valid = labels != ignore_label
  return jnp.where(valid, labels, 0), valid.astype(jnp.float32)


def soft_dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int | None = None,
                   batch_dice: bool = False, include_background: bool = False,
                   smooth: float = 1e-5, mask: jax.Array | None = None,
                   ignore_label: int | None = None) -> jax.Array:
  """``1 - mean soft Dice`` of the softmax probabilities against the one-hot labels.

  nnU-Net v2's ``MemoryEfficientSoftDiceLoss``: per class ``c``,
  ``dice_c = (2 Σ p·y + smooth) / (Σ p + Σ y + smooth)``, sums over the voxels of each sample
  (``batch_dice``: over the batch too, one Dice per class for the whole batch), then the mean over
  classes (and samples). nnU-Net returns ``-dice``; this returns ``1 - dice``, the same gradient
  but 0 at a perfect fit and 1 at none, readable next to other losses.

  ``smooth`` keeps a class absent from both labels and prediction at Dice ≈ 1 and every gradient
  finite. Labels outside ``[0, num_classes)`` (e.g. an ignore value) count as no class.

  Args:
    logits: ``[N, *spatial, num_classes]``.
    labels: integer ``[N, *spatial]`` or ``[N, *spatial, 1]``.
    num_classes: the logits' last dim; ``None`` reads it from them, a number is checked against
      them (catches a model built for another label set).
    batch_dice: one Dice per class over the whole batch (nnU-Net's choice for 3-D full-res)
      instead of one per sample and class.
    include_background: let class 0 into the mean (nnU-Net: no).
    smooth: added to numerator and denominator.
    mask: ``[N]`` sample weights. Per-sample Dice: a weighted mean over samples; ``batch_dice``:
      each sample's sums are weighted. Either way a weight-0 sample has no effect.
    ignore_label: voxels of this label are left out of every sum (nnU-Net v2's ``loss_mask``).

  Returns:
    Scalar float32 loss in ``[0, 1]``.
  """
  if num_classes is None:
    num_classes = logits.shape[-1]
  elif logits.shape[-1] != num_classes:
    raise ValueError(f"logits have {logits.shape[-1]} classes, num_classes={num_classes}")
  first = 0 if include_background else 1
  if num_classes - first < 1:
    raise ValueError(f"no class left for the Dice: num_classes={num_classes}, "
                     f"include_background={include_background}")
  labels, valid = _valid(_class_map(labels, logits), ignore_label)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., first:]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)[..., first:]
  return _soft_dice(probs, onehot, valid, _sample_weights(mask, logits.shape[0]), batch_dice,
                    smooth)


def _soft_dice(probs: jax.Array, targets: jax.Array, valid: jax.Array | None,
               w: jax.Array | None, batch_dice: bool, smooth: float) -> jax.Array:
  """``1 - mean soft Dice`` of probabilities ``[N, *spatial, C]`` against 0/1 targets of the
  same shape, voxels where ``valid`` is 0 left out, samples weighted by ``w``."""
  if valid is not None:
    probs, targets = probs * valid[..., None], targets * valid[..., None]
  axes = tuple(range(1, probs.ndim - 1))
  sums = [jnp.sum(probs * targets, axes), jnp.sum(probs, axes), jnp.sum(targets, axes)]  # [N, C]
  if batch_dice:
    if w is not None:
      sums = [s * w[:, None] for s in sums]
    sums = [jnp.sum(s, 0) for s in sums]
  intersect, sum_pred, sum_gt = sums
  dice = (2.0 * intersect + smooth) / jnp.maximum(sum_pred + sum_gt + smooth, 1e-8)
  if batch_dice:
    return 1.0 - jnp.mean(dice)
  return 1.0 - _weighted_mean(jnp.mean(dice, -1), w)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                  ignore_label: int | None = None) -> jax.Array:
  """Softmax cross-entropy against integer labels, the mean over voxels (and samples).

  Args:
    logits: ``[N, *spatial, C]``.
    labels: integer ``[N, *spatial]`` or ``[N, *spatial, 1]``.
    mask: ``[N]`` sample weights: a weighted mean of the per-sample voxel means.
    ignore_label: voxels of this label are left out: the mean runs over the annotated voxels of
      the batch (PyTorch's ``ignore_index``, as nnU-Net v2), sample weights applied.

  Returns:
    Scalar float32 loss.
  """
  labels, valid = _valid(_class_map(labels, logits), ignore_label)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  w = _sample_weights(mask, logits.shape[0])
  if valid is None:
    per_sample = jnp.mean(ce.reshape(ce.shape[0], -1), axis=1)
    return _weighted_mean(per_sample, w)
  weights = valid if w is None else valid * w.reshape((-1,) + (1,) * (valid.ndim - 1))
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def dice_ce_loss(logits: jax.Array, labels: jax.Array, num_classes: int | None = None, *,
                 weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = False,
                 include_background: bool = False, smooth: float = 1e-5,
                 mask: jax.Array | None = None, ignore_label: int | None = None) -> jax.Array:
  """``weight_ce · cross_entropy + weight_dice · soft_dice_loss``, nnU-Net's ``DC_and_CE_loss``
  (which weighs both 1); see those two for the arguments. Offset by +``weight_dice`` from nnU-Net's
  value, since the Dice term is ``1 - dice`` here."""
  ce = cross_entropy(logits, labels, mask, ignore_label)
  dice = soft_dice_loss(logits, labels, num_classes, batch_dice, include_background, smooth, mask,
                        ignore_label)
  return weight_ce * ce + weight_dice * dice


def region_dice_bce_loss(logits: jax.Array, labels: jax.Array, regions: Sequence[Sequence[int]],
                         *, batch_dice: bool = False, smooth: float = 1e-5,
                         mask: jax.Array | None = None,
                         ignore_label: int | None = None) -> jax.Array:
  """Region-based training's loss, nnU-Net v2's ``DC_and_BCE_loss``: per region (a group of
  label values, `medjax.planning.regions`), sigmoid binary cross-entropy plus the soft Dice of
  the sigmoid probabilities (every region in the Dice: regions have no background channel).

  Args:
    logits: ``[N, *spatial, R]``, one channel per region.
    labels: integer label maps ``[N, *spatial]`` or ``[N, *spatial, 1]``.
    regions: the label values of each region, in the logits' channel order.
    batch_dice, smooth, mask: as `soft_dice_loss`.
    ignore_label: voxels of this label are in neither term (nor their gradients).

  Returns:
    Scalar float32: the mean BCE plus ``1 - mean Dice``.
  """
  if logits.shape[-1] != len(regions):
    raise ValueError(f"logits have {logits.shape[-1]} channels for {len(regions)} regions")
  labels, valid = _valid(_class_map(labels, logits), ignore_label)
  targets = region_targets(labels, regions)
  logits = logits.astype(jnp.float32)
  w = _sample_weights(mask, logits.shape[0])
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), -1)  # [N, *spatial]
  if valid is None:
    bce = _weighted_mean(jnp.mean(bce.reshape(bce.shape[0], -1), axis=1), w)
  else:
    weights = valid if w is None else valid * w.reshape((-1,) + (1,) * (valid.ndim - 1))
    bce = jnp.sum(bce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return bce + _soft_dice(jax.nn.sigmoid(logits), targets, valid, w, batch_dice, smooth)


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
  """nnU-Net v2's weights, highest resolution first: ``1 / 2**i``, the last (lowest-resolution)
  set to 0, normalised to sum 1. ``[1.]`` for a single output."""
  w = 0.5 ** np.arange(num_outputs)
  if num_outputs > 1:
    w[-1] = 0.0
  return w / w.sum()


def downsample_labels(labels: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Integer labels down-sampled to ``spatial_shape`` by nearest neighbour, per axis.

  Each axis's factor ``s`` is the one the network applied, ``ceil(n / m)`` for ``n`` voxels
  going to ``m``. Output voxel ``i`` takes voxel ``min(s·i + s // 2, n - 1)``: PyTorch's
  ``nearest-exact`` interpolation, so for divisible sizes exactly what nnU-Net v2's
  ``DownsampleSegForDSTransform`` gives (the voxel at offset ``s // 2`` inside each block).

  Args:
    labels: ``[N, *spatial]`` or ``[N, *spatial, 1]``.
    spatial_shape: the target ``*spatial``.

  Raises:
    ValueError: no integer factor maps an axis's size to the target (``ceil(n / s) != m``).
  """
  for axis, (n, m) in enumerate(zip(labels.shape[1:], spatial_shape), start=1):
    if n == m:
      continue
    s = -(-n // m)
    if m > n or -(-n // s) != m:
      raise ValueError(f"labels {labels.shape} cannot be down-sampled to {tuple(spatial_shape)}: "
                       f"axis {axis} goes from {n} to {m} voxels, no integer stride gives that")
    idx = np.minimum(np.arange(m) * s + s // 2, n - 1)
    labels = jnp.take(labels, idx, axis=axis)
  return labels


def deep_supervision_loss(outputs: jax.Array | Sequence[jax.Array], labels: jax.Array,
                          loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                          weights: Sequence[float] | None = None) -> jax.Array:
  """Weighted sum of ``loss_fn`` over the outputs of a deep-supervised model.

  Args:
    outputs: logits ``[full res, 1/2, ...]`` (``UNet(deep_supervision=True)``), or one array
      (then this is just ``loss_fn(outputs, labels)``).
    labels: full-resolution integer labels, down-sampled to each output by
      ``downsample_labels`` (nearest-exact, as nnU-Net).
    loss_fn: ``(logits, labels) -> scalar``, e.g.
      ``functools.partial(dice_ce_loss, num_classes=3, mask=mask)``.
    weights: one per output, static (Python/numpy), normalised to sum 1 here; ``None``:
      ``deep_supervision_weights`` (nnU-Net v2). Zero-weight outputs are not evaluated, as in
      nnU-Net's ``DeepSupervisionWrapper``.

  Returns:
    Scalar loss.
  """
  if not isinstance(outputs, (list, tuple)):
    return loss_fn(outputs, labels)
  n = len(outputs)
  w = deep_supervision_weights(n) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (n,) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"need {n} non-negative weights with a positive sum, got {weights}")
  w = w / w.sum()
  total = jnp.zeros((), jnp.float32)
  for wi, out in zip(w, outputs):
    if wi > 0:
      total = total + wi * loss_fn(out, downsample_labels(labels, out.shape[1:-1]))
  return total
