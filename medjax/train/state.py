"""The training state: one pytree passed into and returned from every step."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes.

  Attributes:
    step: number of optimiser updates applied so far (int32 scalar).
    params: model parameters.
    batch_stats: BatchNorm running statistics (an empty dict for models without).
    opt_state: the optax state.
    rng: base key; each step folds in ``step`` so the sequence does not depend on restarts.
    ema: exponential moving average of ``{"params", "batch_stats"}`` used for evaluation, or
      ``{}`` when disabled.
    apply_fn: the model's ``apply`` (static, not saved).
    tx: the optax transformation (static, not saved).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array
  ema: Any
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

  def apply_gradients(self, grads: Any, batch_stats: Any) -> TrainState:
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema
    if self.ema_decay:
      # Short runs: the decay ramps up as (1 + t) / (10 + t), as TensorFlow's EMA with
      # num_updates does, so early averages are not dominated by the random init.
      t = self.step.astype(jnp.float32)
      decay = jnp.minimum(self.ema_decay, (1.0 + t) / (10.0 + t))
      ema = jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, self.ema,
                         {"params": params, "batch_stats": batch_stats})
    return self.replace(step=self.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, ema=ema)

  def eval_variables(self) -> dict[str, Any]:
    """The variables to evaluate with: the EMA when enabled, else the live ones."""
    if self.ema_decay:
      return self.ema
    return {"params": self.params, "batch_stats": self.batch_stats}
