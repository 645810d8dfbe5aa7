"""Optax optimiser and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

import jax
import ml_collections
import optax

from medjax import registry
from medjax.train import finetune


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``cfg.lr`` then cosine decay to ``cfg.lr * cfg.end_lr_factor``."""
  warmup = int(round(cfg.warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_factor)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """Builds the optimiser registered as ``optim.<cfg.name>`` (adamw | sgd), with optional grad
  clipping.

  Weight decay applies to kernels only (rank ≥ 2), not to biases or norm scales. Parameters whose
  '/'-joined paths a regex of ``cfg.freeze`` matches get no update (``optax.set_to_zero`` through
  ``optax.multi_transform``): they keep their values, and no optimiser state.
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  try:
    make = registry.lookup(cfg.name, "optim.")
  except KeyError:
    raise ValueError(f"unknown optimiser {cfg.name!r} ({'|'.join(_names())})") from None
  tx = make(cfg, schedule)
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  freeze = tuple(cfg.get("freeze") or ())
  if freeze:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               finetune.freeze_labels(freeze))
  return tx


@registry.register("optim.adamw")
def adamw(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with decoupled weight decay on kernels."""
  return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_kernel_mask)


@registry.register("optim.sgd")
def sgd(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Nesterov SGD with L2 weight decay on kernels, added to the gradient."""
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_kernel_mask),
                     optax.sgd(schedule, momentum=cfg.momentum, nesterov=True))


def _names() -> list[str]:
  return [n.removeprefix("optim.") for n in registry.names("optim.")]


def _kernel_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)
