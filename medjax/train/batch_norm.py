"""BatchNorm statistics recomputed on un-augmented training images ("precise BN").

During training, BatchNorm keeps an exponential moving average of the statistics of augmented
batches. Where augmentation moves those statistics far from what evaluation sees (AdrenalMNIST3D
slices resampled by an affine: mostly empty masks, first-layer variance ≈ 0.01), the running
averages misnormalise every val image. Recomputing them with the final weights on training images
under the *eval* transforms, as an equal-weight average over batches, removes the mismatch
(Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021; pycls/Detectron2's ``PreciseBN``).

Flax's ``BatchNorm`` has no hook for raw batch statistics, so they are read back from its running
average update ``new = m · old + (1 − m) · batch``: applied from ``old = 0`` that gives
``(1 − m) · batch``, and one extra call from ``old = 1`` gives ``m`` per leaf, whatever momentum
each layer uses.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp


def _running_update(apply_fn: Callable[..., Any], params: Any, batch_stats: Any,
                    images: jax.Array) -> Any:
  """The batch_stats after one train-mode call on ``images`` starting from ``batch_stats``."""
  # Dropout (after the normalised layers in medjax models) needs a key in train mode; a fixed
  # one keeps the recalibration deterministic.
  _, updates = apply_fn({"params": params, "batch_stats": batch_stats}, images, train=True,
                        mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
  return updates["batch_stats"]


def make_batch_stats_fns(apply_fn: Callable[..., Any]):
  """``(scaled_stats, momenta)``, both ``(params, batch_stats, images) -> batch_stats tree``.

  ``scaled_stats`` returns ``(1 − m) · statistics of images`` per leaf; ``momenta`` returns ``m``.
  Jit them with the caller's shardings.
  """

  def scaled_stats(params, batch_stats, images):
    return _running_update(apply_fn, params, jax.tree.map(jnp.zeros_like, batch_stats), images)

  def momenta(params, batch_stats, images):
    ones = _running_update(apply_fn, params, jax.tree.map(jnp.ones_like, batch_stats), images)
    zeros = scaled_stats(params, batch_stats, images)
    return jax.tree.map(jnp.subtract, ones, zeros)

  return scaled_stats, momenta


def recalibrate(scaled_stats_fn, momenta_fn, params: Any, batch_stats: Any,
                batches: Iterable[jax.Array]) -> Any:
  """BatchNorm statistics averaged with equal weight over ``batches`` (image arrays).

  Args:
    scaled_stats_fn, momenta_fn: from `make_batch_stats_fns`, jitted.
    params, batch_stats: the model's variables; ``batch_stats`` gives the tree's structure.
    batches: at least one batch of images, transformed as for evaluation.

  Returns:
    A ``batch_stats`` tree like the input one. Models without BatchNorm get theirs back.
  """
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  total, count, momenta = None, 0, None
  for images in batches:
    if momenta is None:
      momenta = momenta_fn(params, batch_stats, images)
    scaled = scaled_stats_fn(params, batch_stats, images)
    total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    count += 1
  if not count:
    raise ValueError("BatchNorm recalibration needs at least one batch")
  # A leaf whose momentum is 1 never updates (a frozen layer): keep its statistics.
  return jax.tree.map(
      lambda t, m, old: jnp.where(m < 1.0, t / (count * jnp.maximum(1.0 - m, 1e-12)), old),
      total, momenta, batch_stats)
