"""The loop's jitted computations: one training step (mixup, modality dropout, a finiteness
flag), one evaluation step (with flip averaging), an evaluation over a split, and the batch-norm
recalibration before each evaluation. `medjax.train.loop` builds them from the config."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax.data import pipeline
from medjax.models import fusion
from medjax.train import batch_norm, sharding, tasks, tta
from medjax.train.state import TrainState


def make_train_step(task: tasks.Task, mixup: float = 0.0, modality_dropout: float = 0.0):
  """``(state, batch) -> (state, {"loss", "finite"})``: one optimiser update on a global batch.

  ``modality_dropout > 0``: each image loses one input channel (modality), zeroed, with this
  probability, never all of them (`medjax.models.fusion.modality_dropout`), so that the model
  can be run with a modality missing (zero-filled, `medjax.infer.segment.match_channels`).

  ``mixup > 0``: mixup (Zhang et al., 2018) with ``λ ~ Beta(mixup, mixup)`` per step: each image
  is blended with its neighbour in the (already shuffled) batch, ``λ·x_i + (1-λ)·x_{i-1}``, and the
  loss is the same blend of the two targets' losses — the loss of the blended target for a loss
  linear in its target, as cross-entropy is.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    images = batch["image"]
    if modality_dropout:
      images = fusion.modality_dropout(jax.random.fold_in(dropout_rng, 2), images,
                                       modality_dropout)
    if mixup:
      lam = jax.random.beta(jax.random.fold_in(dropout_rng, 1), mixup, mixup)
      partner = jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), batch)
      images = lam * images + (1.0 - lam) * partner["image"]

    def loss_fn(params):
      outputs, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_rng})
      loss = task.loss_fn(outputs, batch)
      if mixup:
        loss = lam * loss + (1.0 - lam) * task.loss_fn(outputs, partner)
      return jnp.mean(loss), updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    finite = jnp.isfinite(loss) & jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads))
    return state.apply_gradients(grads, batch_stats), {"loss": loss, "finite": finite}

  return train_step


def make_eval_step(task: tasks.Task, flip_axes: tuple[int, ...] = ()):
  """``(state, batch) -> (predictions, labels, mask)`` for one global eval batch; predictions are
  averaged over the flips of ``flip_axes`` (`medjax.train.tta`)."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    def predict(images):
      return task.predict_fn(state.apply_fn(state.eval_variables(), images, train=False))

    return tta.flip_averaged(predict, batch["image"], flip_axes), batch["label"], batch["mask"]

  return eval_step


def evaluate(state, eval_step, source, eval_tf, batch_size: int, mesh, task: tasks.Task):
  """Runs ``eval_step`` over the whole split; returns ``(metrics, labels, predictions)``.

  ``batch_size`` is capped by the split's size (`pipeline.capped_batch_size`)."""
  batch_size = pipeline.capped_batch_size(batch_size, len(source),
                                          math.lcm(mesh.size, jax.process_count()))
  preds, labels = [], []
  for batch in pipeline.eval_batches(source, eval_tf, global_batch_size=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    p, y, m = jax.device_get(eval_step(state, sharding.to_global(batch, mesh)))
    keep = np.asarray(m) > 0
    preds.append(np.asarray(p)[keep])
    labels.append(np.asarray(y)[keep])
  labels_np, preds_np = np.concatenate(labels), np.concatenate(preds)
  return task.metrics_fn(labels_np, preds_np), labels_np, preds_np


def make_bn_recalibration(apply_fn, train_src, eval_tf, config: ml_collections.ConfigDict,
                          mesh) -> Callable[[TrainState], TrainState]:
  """``state -> state`` with the evaluated BatchNorm statistics (the EMA's when enabled)
  recomputed on the first ``train.bn_recalibration_batches`` eval-size batches of training
  images under the eval transforms (`medjax.train.batch_norm`)."""
  num_batches = min(config.train.bn_recalibration_batches,
                    len(train_src) // config.eval.batch_size)
  if num_batches < 1:
    raise ValueError(f"train.bn_recalibration_batches: the {len(train_src)} training records do "
                     f"not fill one eval batch of {config.eval.batch_size}")
  repl, data_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  scaled, momenta = batch_norm.make_batch_stats_fns(apply_fn)
  # Called back to back: over several CPU devices, one at a time (see `sharding.one_at_a_time`).
  scaled, momenta = (sharding.one_at_a_time(
      jax.jit(f, in_shardings=(repl, repl, data_sharding), out_shardings=repl), mesh)
                     for f in (scaled, momenta))

  def images():
    batches = pipeline.eval_batches(train_src, eval_tf, global_batch_size=config.eval.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    for _, batch in zip(range(num_batches), batches):
      yield sharding.to_global({"image": batch["image"]}, mesh)["image"]

  def recalibrate(state: TrainState) -> TrainState:
    variables = state.eval_variables()
    stats = batch_norm.recalibrate(scaled, momenta, variables["params"],
                                   variables["batch_stats"], images())
    if state.ema_decay:
      return state.replace(ema={**state.ema, "batch_stats": stats})
    return state.replace(batch_stats=stats)

  return recalibrate
