"""Tasks: what a model's outputs mean — the loss to train on and the metrics to select with.

The one training loop (``loop.py``) is generic over a ``Task``; adding a task means adding an
registered function here, never copying the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import registry
from medjax.metrics import fusion as fusion_metrics
from medjax.metrics import selection as metrics_lib
from medjax.planning.regions import labels_from_regions
from medjax.train import fusion_losses, losses


@dataclasses.dataclass(frozen=True)
class Task:
  """A model-output contract.

  Attributes:
    name: registry name.
    loss_fn: ``(outputs, batch) -> per-example loss [B]`` or a scalar (jnp, inside jit).
    predict_fn: ``outputs -> predictions`` kept for evaluation (jnp, inside jit).
    metrics_fn: ``(labels, predictions) -> {name: float}`` over a whole split (numpy, on host).
    metric_names: ``num_classes -> names``: the keys ``metrics_fn`` reports, known before any
      evaluation (so that ``eval.best_metric`` is checked before training).
  """

  name: str
  loss_fn: Callable[[jax.Array, dict], jax.Array]
  predict_fn: Callable[[jax.Array], jax.Array]
  metrics_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]]
  metric_names: Callable[[int], tuple[str, ...]]


# Reported metrics where lower is better: checkpoints are kept on the highest value, so these
# cannot be ``eval.best_metric``.
LOWER_IS_BETTER = frozenset({"nll"})


def _probability_metrics(num_classes: int) -> tuple[str, ...]:
  del num_classes
  return ("acc", "auc", "nll")


def _dice_metrics(num_classes: int) -> tuple[str, ...]:
  """``dice`` (the mean) and ``dice_k`` for each foreground class, as `pseudo_dice` names them."""
  return ("dice", *(f"dice_{k}" for k in range(1, max(num_classes, 2))))


@registry.register("tasks.classification")
def classification(label_smoothing: float = 0.0) -> Task:
  """Single-label classification: softmax cross-entropy; ACC/AUC on class probabilities."""

  def loss_fn(logits: jax.Array, batch: dict) -> jax.Array:
    k = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], k), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)

  return Task("classification", loss_fn, jax.nn.softmax, metrics_lib.classification_metrics,
              _probability_metrics)


@registry.register("tasks.multilabel_classification")
def multilabel_classification(label_smoothing: float = 0.0) -> Task:
  """Independent binary labels (e.g. ChestMNIST): sigmoid cross-entropy per label."""

  def loss_fn(logits: jax.Array, batch: dict) -> jax.Array:
    targets = batch["label"].astype(jnp.float32)
    targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets), -1)

  return Task("multilabel_classification", loss_fn, jax.nn.sigmoid,
              metrics_lib.multilabel_metrics, _probability_metrics)


@registry.register("tasks.segmentation")
def segmentation(label_smoothing: float = 0.0, batch_dice: bool = True,
                 ignore_label: int | None = None,
                 regions: Sequence[dict] | None = None) -> Task:
  """Voxel-wise classes: Dice + cross-entropy (summed over deep-supervision heads when the model
  returns several); evaluated with nnU-Net's pseudo Dice over whole val patches. Voxels labelled
  ``ignore_label`` (not annotated; the plan's) count in neither the loss nor the metrics.

  ``regions`` (the plan's, `medjax.planning.regions`): one sigmoid output per region, trained with
  Dice + binary cross-entropy per region; predictions are label maps in the regions' order and
  the pseudo Dice is per region (``dice_1`` the first)."""
  del label_smoothing  # nnU-Net trains without it; accepted so configs share one signature
  groups = [tuple(r["labels"]) for r in regions] if regions else None
  if groups:
    loss = functools.partial(losses.region_dice_bce_loss, regions=groups,
                             batch_dice=batch_dice, ignore_label=ignore_label)
  else:
    loss = functools.partial(losses.dice_ce_loss, batch_dice=batch_dice,
                             ignore_label=ignore_label)

  def loss_fn(outputs, batch: dict) -> jax.Array:
    labels = batch["label"][..., 0].astype(jnp.int32)
    if isinstance(outputs, (list, tuple)):
      return losses.deep_supervision_loss(outputs, labels, loss)
    return loss(outputs, labels)

  def predict_fn(outputs) -> jax.Array:
    logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    if groups:
      probs = jax.nn.sigmoid(logits.astype(jnp.float32))
      return labels_from_regions(probs, [r["label"] for r in regions]).astype(jnp.int8)
    return jnp.argmax(logits, axis=-1).astype(jnp.int8)

  metrics_fn = functools.partial(metrics_lib.pseudo_dice, ignore_label=ignore_label,
                                 regions=groups)
  metric_names = _dice_metrics
  if groups:
    metric_names = lambda _: ("dice", *(f"dice_{k}" for k in range(1, len(groups) + 1)))
  return Task("segmentation", loss_fn, predict_fn, metrics_fn, metric_names)


@registry.register("tasks.fusion")
def fusion(label_smoothing: float = 0.0, ssim_weight: float = 1.0, gradient_weight: float = 10.0,
           intensity_weight: float = 1.0) -> Task:
  """Unsupervised pixel-level fusion of two sources (the image's two channels, in [0, 1]) into
  the model's one-channel output: `fusion_losses.fusion_loss` with these weights; evaluated with
  the eight fusion metrics (`medjax.metrics.fusion`) against the record's ``label``, the sources'
  grey levels 0..255 (``[H, W, 2]``), the fused image rounded to 0..255 first."""
  del label_smoothing  # no labels to smooth; accepted so configs share one signature

  def loss_fn(outputs: jax.Array, batch: dict) -> jax.Array:
    return fusion_losses.fusion_loss(outputs, batch["image"], ssim_weight, gradient_weight,
                                     intensity_weight)

  def predict_fn(outputs: jax.Array) -> jax.Array:
    return jnp.clip(outputs.astype(jnp.float32), 0.0, 1.0)

  def metrics_fn(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    return fusion_metrics.mean_metrics(labels, 255.0 * np.asarray(predictions, np.float64))

  return Task("fusion", loss_fn, predict_fn, metrics_fn, lambda _: fusion_metrics.METRICS)


def get_task(name: str, **kwargs) -> Task:
  """The task registered as ``tasks.<name>``, built with ``kwargs``.

  Raises:
    KeyError: an unknown name; the message lists the known ones.
  """
  return registry.lookup(name, "tasks.")(**kwargs)
