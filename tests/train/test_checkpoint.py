"""Checkpointer retention: the last ``keep`` plus the best by the eval metric, across restarts."""

import jax
import jax.numpy as jnp
import optax

from medjax.train.checkpoint import Checkpointer
from medjax.train.state import TrainState


def _state(value):
  params = {"w": jnp.full((3,), value, jnp.float32)}
  tx = optax.sgd(0.1)
  return TrainState(step=jnp.asarray(value, jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(0), ema={}, apply_fn=None,
                    tx=tx)


def test_best_checkpoint_is_ranked_and_survives_a_restart(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(directory, keep=2)
  # Step 4 is a checkpoint-only save (no evaluation): it must neither count as best nor warn.
  for step, auc in ((1, 0.9), (2, 0.5), (3, 0.6), (4, None)):
    ckpt.save(step, _state(step), None, metrics=None if auc is None else {"auc": auc})
  assert ckpt.all_steps() == [1, 3, 4]
  assert ckpt.best_step() == 1
  assert "did not provide metrics" not in caplog.text
  ckpt.close()

  # A resumed run still knows step 1 is best: its metrics were written with it.
  ckpt = Checkpointer(directory, keep=2)
  assert ckpt.best_step() == 1
  ckpt.save(5, _state(5), None, metrics={"auc": 0.7})
  assert ckpt.all_steps() == [1, 4, 5]
  assert ckpt.best_step() == 1
  assert int(ckpt.restore(1, _state(0)).params["w"][0]) == 1
  ckpt.close()
