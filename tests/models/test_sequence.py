"""Slice-sequence models: RNN maths against a step-by-step reference, direction, masking,
attention weights, training through the engine's step, the 2.5-D baseline and the configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import adrenalmnist3d_2p5d, adrenalmnist3d_gru, adrenalmnist3d_lstm
from medjax import registry
from medjax.models import sequence
from medjax.train import loop, tasks
from medjax.train.state import TrainState

HIDDEN = 5
ENCODER = "small_cnn(features=(4,))"  # 4 features per slice: the RNN, not the CNN, is under test


@pytest.fixture(autouse=True, scope="module")
def _quick_compiles():
  """Tiny graphs compiled once each: XLA's optimisation passes cost more time than they save."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _model(name="slice_lstm", **kw):
  kw = {"encoder": ENCODER, "hidden": HIDDEN, "num_classes": 3, **kw}
  return registry.lookup(f"models.{name}")(**kw)


def _volumes(seed, shape=(2, 6, 8, 8, 1)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _init(model, x):
  return model.init(jax.random.PRNGKey(1), x, train=False)


def _apply(model, variables, x, seq_lengths=None, **kw):
  return model.apply(variables, x, train=False, seq_lengths=seq_lengths, **kw)


# ---------------------------------------------------------------------------------------------
# (a) The cells inside the model match the LSTM/GRU equations, written out here.
# ---------------------------------------------------------------------------------------------

def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _lstm_step(p, carry, x):
  """flax.linen.LSTMCell: input kernels ``i{i,f,g,o}`` (no bias), recurrent ``h{i,f,g,o}``."""
  c, h = carry
  gate = lambda n: x @ p["i" + n]["kernel"] + h @ p["h" + n]["kernel"] + p["h" + n]["bias"]
  i, f, g, o = _sigmoid(gate("i")), _sigmoid(gate("f")), np.tanh(gate("g")), _sigmoid(gate("o"))
  c = f * c + i * g
  h = o * np.tanh(c)
  return (c, h), h


def _gru_step(p, h, x):
  """flax.linen.GRUCell: input kernels ``i{r,z,n}`` with bias; ``hn`` alone has a bias, inside
  the reset gate's product."""
  dense = lambda name, v: v @ p[name]["kernel"] + p[name].get("bias", 0.0)
  r = _sigmoid(dense("ir", x) + dense("hr", h))
  z = _sigmoid(dense("iz", x) + dense("hz", h))
  n = np.tanh(dense("in", x) + r * dense("hn", h))
  h = (1.0 - z) * n + z * h
  return h, h


def _run(cell, p, seq):
  zeros = np.zeros(HIDDEN)
  carry, step = ((zeros, zeros), _lstm_step) if cell == "lstm" else (zeros, _gru_step)
  out = []
  for x in seq:
    carry, y = step(p, carry, x)
    out.append(y)
  return out


def _reference_logits(params, feats, lengths, cell, bidirectional, num_layers):
  """Loops over slices one at a time, in float64, then "last" pooling and the head."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  logits = []
  for b, n in enumerate(lengths):
    seq = list(feats[b, :n])
    for i in range(num_layers):
      p = params[f"rnn_{i}"]
      if bidirectional:
        fwd = _run(cell, p["forward_rnn"]["cell"], seq)
        bwd = _run(cell, p["backward_rnn"]["cell"], seq[::-1])[::-1]
        seq = [np.concatenate([f, k]) for f, k in zip(fwd, bwd)]
      else:
        seq = _run(cell, p["cell"], seq)
    pooled = np.concatenate([seq[-1][:HIDDEN], seq[0][HIDDEN:]]) if bidirectional else seq[-1]
    logits.append(pooled @ params["head"]["kernel"] + params["head"]["bias"])
  return np.stack(logits)


@pytest.mark.parametrize("cell,bidirectional,num_layers",
                         [("lstm", False, 1), ("gru", False, 1), ("lstm", True, 2),
                          ("gru", True, 2)])
def test_cells_match_a_step_by_step_reference(cell, bidirectional, num_layers):
  model = _model(f"slice_{cell}", bidirectional=bidirectional, num_layers=num_layers,
                 pooling="last")
  x = _volumes(0)
  variables = _init(model, x)
  lengths = np.array([6, 4])
  logits, state = _apply(model, variables, x, lengths, capture_intermediates=True,
                         mutable=("intermediates",))
  feats = np.asarray(state["intermediates"]["encoder"]["__call__"][0], np.float64)
  expected = _reference_logits(variables["params"], feats.reshape(2, 6, -1), lengths, cell,
                               bidirectional, num_layers)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (b) The backward direction reads the slices in reverse.
# ---------------------------------------------------------------------------------------------

def _rnn_outputs(model, variables, x, lengths):
  _, state = _apply(model, variables, x, lengths, capture_intermediates=True,
                    mutable=("intermediates",))
  return np.asarray(state["intermediates"]["rnn_0"]["__call__"][0])  # [B, T, 2 * HIDDEN]


def test_backward_direction_reads_slices_in_reverse():
  model = _model(bidirectional=True, pooling="mean")
  x = _volumes(0)
  variables = _init(model, x)
  lengths = jnp.array([6, 4])
  out = _rnn_outputs(model, variables, x, lengths)

  # Changing the last valid slice of each volume: the forward outputs before it stay, the
  # backward output at slice 0 (which has read every slice) moves.
  changed = x.at[0, 5].set(3.0).at[1, 3].set(3.0)
  out2 = _rnn_outputs(model, variables, changed, lengths)
  np.testing.assert_allclose(out2[0, :5, :HIDDEN], out[0, :5, :HIDDEN], atol=1e-6)
  np.testing.assert_allclose(out2[1, :3, :HIDDEN], out[1, :3, :HIDDEN], atol=1e-6)
  assert np.abs(out2[:, 0, HIDDEN:] - out[:, 0, HIDDEN:]).min() > 1e-4

  # With the backward weights set to the forward ones, reversing each volume's valid slices
  # swaps the two directions' outputs (at the mirrored positions).
  params = dict(variables["params"])
  params["rnn_0"] = {"forward_rnn": params["rnn_0"]["forward_rnn"],
                     "backward_rnn": params["rnn_0"]["forward_rnn"]}
  tied = {**variables, "params": params}
  out = _rnn_outputs(model, tied, x, lengths)
  reversed_x = jnp.stack([x[0, ::-1], jnp.concatenate([x[1, 3::-1], x[1, 4:]])])
  out_r = _rnn_outputs(model, tied, reversed_x, lengths)
  for b, n in enumerate([6, 4]):
    np.testing.assert_allclose(out_r[b, :n][::-1, HIDDEN:], out[b, :n, :HIDDEN], atol=1e-5)
    np.testing.assert_allclose(out_r[b, :n][::-1, :HIDDEN], out[b, :n, HIDDEN:], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (c) Padding slices beyond seq_lengths change nothing; (d) attention weights.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling,bidirectional,slice_stride,num_layers,context", [
    ("last", False, 1, 1, 0), ("mean", False, 1, 1, 1), ("attention", False, 2, 1, 0),
    ("last", True, 2, 2, 2), ("mean", True, 1, 1, 0), ("attention", True, 1, 1, 1)])
def test_padding_slices_change_nothing(pooling, bidirectional, slice_stride, num_layers,
                                       context):
  model = _model(pooling=pooling, bidirectional=bidirectional, num_layers=num_layers,
                 slice_stride=slice_stride, context=context)
  apply = jax.jit(functools.partial(model.apply, train=False))
  x = _volumes(0, (2, 8, 8, 8, 1))
  variables = _init(model, x)
  lengths = jnp.array([6, 3])
  logits = apply(variables, x, seq_lengths=lengths)
  # Other content in the padding slices...
  noise = _volumes(1, (2, 8, 8, 8, 1))
  padded = jnp.where(jnp.arange(8)[None, :, None, None, None] < lengths[:, None, None, None, None],
                     x, noise)
  np.testing.assert_allclose(apply(variables, padded, seq_lengths=lengths), logits, atol=1e-5)
  # ...and the same logits as the shorter volume with no padding at all.
  np.testing.assert_allclose(apply(variables, x[1:, :3])[0], logits[1], atol=1e-5)


def test_neighbouring_slices_become_channels():
  x = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1, 1, 1) + 1  # slice t of volume b
  slab = np.asarray(sequence.with_neighbours(x, 1, seq_lengths=jnp.array([4, 3])))[:, :, 0, 0]
  np.testing.assert_array_equal(slab[0], [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0]])
  # Volume 1 has 3 valid slices: its padding slice (8) is never anyone's neighbour.
  np.testing.assert_array_equal(slab[1, :3], [[0, 5, 6], [5, 6, 7], [6, 7, 0]])
  assert sequence.with_neighbours(x, 0) is x
  with pytest.raises(ValueError, match="context"):
    sequence.with_neighbours(x, -1)


def test_attention_weights_are_sown_and_masked():
  model = _model(pooling="attention", slice_stride=2)
  x = _volumes(0, (2, 8, 8, 8, 1))
  variables = _init(model, x)
  logits, state = _apply(model, variables, x, jnp.array([7, 1]), mutable=("intermediates",))
  (weights,) = state["intermediates"]["slice_attention"]
  weights = np.asarray(weights)
  assert logits.shape == (2, 3) and weights.shape == (2, 4)  # 8 slices at stride 2
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  valid = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)  # ceil(length / 2) strided slices
  assert np.all(weights[~valid] == 0.0) and np.all(weights[valid] > 0.0)
  # Without a mutable "intermediates" collection nothing is sown and only logits come back.
  np.testing.assert_allclose(_apply(model, variables, x, jnp.array([7, 1])), logits, atol=1e-6)


def test_slice_axes_and_stride():
  x = np.arange(2 * 4 * 5 * 6 * 1).reshape(2, 4, 5, 6, 1)
  for axis, name in ((1, "axial"), (2, "coronal"), (3, "sagittal")):
    out = sequence.slices_first(jnp.asarray(x), name, 2)
    np.testing.assert_array_equal(out, np.moveaxis(x, axis, 1)[:, ::2])
  with pytest.raises(ValueError, match="slice_axis"):
    sequence.slices_first(jnp.asarray(x), "oblique")
  with pytest.raises(ValueError, match="pooling"):
    _init(_model(pooling="max"), _volumes(0))


# ---------------------------------------------------------------------------------------------
# (e) Training through the engine's step; the 2.5-D baseline; the configs.
# ---------------------------------------------------------------------------------------------

def test_trains_through_the_engine_train_step():
  model = _model("slice_gru", bidirectional=False)
  x = _volumes(0, (4, 6, 8, 8, 1))
  variables = _init(model, x)
  tx = optax.adam(1e-2)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(2), ema={},
                     apply_fn=model.apply, tx=tx)
  batch = {"image": x, "label": jnp.array([0, 1, 2, 1])}
  step = jax.jit(loop.make_train_step(tasks.classification()))
  new, out = step(state, batch)
  new, out2 = step(new, batch)
  assert bool(out["finite"]) and bool(out2["finite"]) and float(out2["loss"]) < float(out["loss"])
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
  assert all(jax.tree.leaves(moved))  # every parameter, encoder to head, gets a gradient
  assert int(new.step) == 2


def test_registered_cells():
  x = _volumes(0)
  for name, gate in (("slice_lstm", "if"), ("slice_gru", "iz"), ("slice_rnn", "i")):
    shapes = jax.eval_shape(lambda m=_model(name, bidirectional=False): _init(m, x))
    assert gate in shapes["params"]["rnn_0"]["cell"]


def test_2p5d_slices_become_channels():
  model = registry.lookup("models.resnet18_2p5d")(num_classes=3, slice_axis="coronal",
                                                  slice_stride=2, width=32)
  assert isinstance(model, sequence.SlicesAsChannels) and model.slice_axis == "coronal"
  assert model.backbone.stage_sizes == (2, 2, 2, 2) and model.backbone.width == 32
  x = _volumes(0, (2, 6, 8, 10, 1))
  # On a tiny backbone: 8 coronal slices at stride 2 → 4 input channels, and the logits.
  model = sequence.SlicesAsChannels(sequence.SmallCNN(features=(4,), num_classes=3),
                                    slice_axis="coronal", slice_stride=2)
  variables = _init(model, x)
  conv = variables["params"]["backbone"]["ConvNormAct_0"]["Conv_0"]["kernel"]
  assert conv.shape == (3, 3, 4, 4)
  lengths = jnp.array([8, 5])
  logits = _apply(model, variables, x, lengths)
  assert logits.shape == (2, 3)
  # Padding slices are zeroed before they become channels, so their content does not matter.
  np.testing.assert_allclose(_apply(model, variables, x.at[1, :, 6:].set(9.0), lengths), logits,
                             atol=1e-5)


@pytest.mark.parametrize("module", [adrenalmnist3d_lstm, adrenalmnist3d_gru, adrenalmnist3d_2p5d])
def test_configs_build_models_for_28_and_64(module):
  for arg, size in ((None, 28), ("runlocal", 28), ("64", 64), ("64,runlocal", 64)):
    c = module.get_config(arg)
    assert c.data.size == size and c.data.name == "adrenalmnist3d"
    assert (c.train.steps is not None) == ("runlocal" in (arg or ""))
    model = loop.build_model(c.model, num_classes=2)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, size, size, size, 1))))
    assert "params" in shapes
  with pytest.raises(ValueError, match="unknown"):
    module.get_config("128")
