"""BatchNorm recalibration ("precise BN"): equal-weight batch statistics, read back from flax's
running-average update whatever each layer's momentum, and its use before evaluation in the loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from helpers import config as _config
from helpers import final_params as _final_params

from medjax.train import batch_norm, loop


class _TwoNorms(nn.Module):
  """BatchNorm straight on the input (so its statistics are the input's), then a Dense and a
  second BatchNorm with another momentum."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="first")(x)
    x = nn.Dense(3)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, name="second")(x)


def _recalibrate(model, variables, batches):
  scaled, momenta = map(jax.jit, batch_norm.make_batch_stats_fns(model.apply))
  return batch_norm.recalibrate(scaled, momenta, variables["params"], variables["batch_stats"],
                                batches)


def test_statistics_are_the_equal_weight_average_over_batches():
  model = _TwoNorms()
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  # Batches with different means and spreads: a running average would weigh the last most.
  batches = [jax.random.normal(k, (16, 4)) * (i + 1) + 3.0 * i for i, k in enumerate(keys)]
  variables = model.init(jax.random.PRNGKey(1), batches[0])
  stats = _recalibrate(model, variables, batches)
  expected_mean = np.mean([np.mean(b, axis=0) for b in batches], axis=0)
  expected_var = np.mean([np.var(b, axis=0) for b in batches], axis=0)
  np.testing.assert_allclose(stats["first"]["mean"], expected_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["first"]["var"], expected_var, rtol=1e-4)
  # The second layer (momentum 0.99) is read back just as well: its statistics are those of the
  # normalised-then-projected batches.
  per_batch = []
  for b in batches:
    _, upd = model.apply({**variables, "batch_stats": jax.tree.map(jnp.zeros_like,
                                                                   variables["batch_stats"])},
                         b, train=True, mutable=["batch_stats"])
    per_batch.append(upd["batch_stats"]["second"]["mean"] / 0.01)
  np.testing.assert_allclose(stats["second"]["mean"], np.mean(per_batch, axis=0), rtol=1e-3,
                             atol=1e-4)


def test_recalibrated_statistics_normalise_the_eval_data():
  model = _TwoNorms()
  data = jax.random.normal(jax.random.PRNGKey(2), (64, 4)) * 5.0 + 2.0
  variables = model.init(jax.random.PRNGKey(1), data)  # running stats: mean 0, var 1
  stats = _recalibrate(model, variables, [data[:32], data[32:]])
  first = nn.BatchNorm(use_running_average=True, momentum=0.9)
  out = first.apply({"params": variables["params"]["first"], "batch_stats": stats["first"]}, data)
  np.testing.assert_allclose(np.mean(out, axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.std(out, axis=0), 1.0, atol=0.05)


def test_models_without_batch_norm_are_returned_unchanged():
  model = nn.Dense(2)
  variables = {"params": model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"],
               "batch_stats": {}}
  assert _recalibrate(model, variables, [jnp.ones((4, 3))]) == {}


def test_loop_recalibrates_before_each_evaluation(synthetic_medmnist, tmp_path):
  base = loop.train_and_evaluate(_config(synthetic_medmnist, **{"eval.batch_size": 8}),
                                str(tmp_path / "base"))
  recal = loop.train_and_evaluate(
      _config(synthetic_medmnist, **{"train.bn_recalibration_batches": 1, "eval.batch_size": 8}),
      str(tmp_path / "recal"))
  a, b = _final_params(str(tmp_path / "base")), _final_params(str(tmp_path / "recal"))
  # Training is unchanged (running statistics are not used in train mode)...
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # ...but the statistics evaluated and saved are the recomputed ones.
  diffs = [float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a["batch_stats"]),
                                                         jax.tree.leaves(b["batch_stats"]))]
  assert max(diffs) > 1e-3, diffs
  assert base["steps"] == recal["steps"]
