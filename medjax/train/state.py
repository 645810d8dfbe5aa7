"""The training state: one pytree passed into and returned from every step."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes.

  Attributes:
    step: number of optimiser updates applied so far (int32 scalar).
    params: model parameters.
    batch_stats: BatchNorm running statistics (an empty dict for models without).
    opt_state: the optax state.
    rng: base key; each step folds in ``step`` so the sequence does not depend on restarts.
    apply_fn: the model's ``apply`` (static, not saved).
    tx: the optax transformation (static, not saved).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Any, batch_stats: Any) -> TrainState:
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
