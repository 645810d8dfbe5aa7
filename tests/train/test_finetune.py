"""Fine-tuning (``init_from``): a run starts from another run's weights, its head skipped and its
encoder frozen; mismatched shapes are one error naming every parameter; a resumed fine-tuned run
restores its own checkpoint."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import computed_once, write_multilabel_medmnist, write_synthetic_medmnist
from flax import traverse_util
from helpers import config, final_params, launch_module

from medjax.io.errors import MedjaxIOError
from medjax.train import finetune, loop

# The ResNet's trunk: everything but its head (Dense_0).
TRUNK = "^(ConvNormAct|BasicBlock)"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """``(workdir, data)``: a finished 2-class ResNet run (pneumonia-like synthetic data)."""

  def train(root):
    data = write_synthetic_medmnist(root)
    workdir = os.path.join(root, "run")
    loop.train_and_evaluate(config(data, steps=4), workdir)
    return workdir, data

  return computed_once(tmp_path_factory, "finetune_source", train)


def _chest(tmp_path, **overrides):
  """A 14-label ChestMNIST-like run's config: the source's trunk fits it, its head does not."""
  data = write_multilabel_medmnist(str(tmp_path / "chest"))
  return config(data, steps=4, **{"data.name": "chestmnist", "eval.every_steps": 4,
                                  "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 10,
                                  **overrides})


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def test_skipped_head_and_frozen_trunk(source, tmp_path):
  src, _ = source
  workdir = str(tmp_path / "tuned")
  # With an EMA, which starts from the loaded weights too (in buffers of its own).
  loop.train_and_evaluate(_chest(tmp_path, init_from=src, init_skip=("^Dense_0/",),
                                 **{"optim.freeze": (TRUNK,), "train.ema_decay": 0.5}), workdir)
  before, after = _flat(final_params(src)["params"]), _flat(final_params(workdir)["params"])
  ema = _flat(final_params(workdir)["ema"]["params"])
  trunk = [p for p in after if not p.startswith("Dense_0/")]
  assert trunk and all(np.array_equal(after[p], before[p]) for p in trunk)
  # (An average of equal values, up to its rounding.)
  assert all(np.allclose(ema[p], before[p], rtol=1e-6, atol=1e-7) for p in trunk)
  assert after["Dense_0/kernel"].shape == (before["Dense_0/kernel"].shape[0], 14)
  # The head trained: it is no longer the fresh run's initial head (same seed, same init).
  scratch = str(tmp_path / "scratch")
  loop.train_and_evaluate(_chest(tmp_path, **{"train.steps": 1, "optim.lr": 1e-12}), scratch)
  init = _flat(final_params(scratch)["params"])
  assert not np.allclose(after["Dense_0/kernel"], init["Dense_0/kernel"], atol=1e-6)
  # Frozen parameters keep no optimiser state: AdamW's two moments cover the head alone.
  opt = sum(a.size for a in jax.tree.leaves(final_params(workdir)["opt_state"]))
  assert opt < 3 * (after["Dense_0/kernel"].size + after["Dense_0/bias"].size)


def test_a_finetuned_run_resumes_from_its_own_checkpoint(source, tmp_path):
  src = str(tmp_path / "source")
  shutil.copytree(source[0], src)
  ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
  c = _chest(tmp_path, init_from=src, init_skip=("^Dense_0/",))
  loop.train_and_evaluate(c, ref)
  shutil.copytree(ref, cut)
  for step in (3, 4):
    shutil.rmtree(os.path.join(cut, "checkpoints", str(step)))
  os.remove(os.path.join(cut, "summary.json"))
  shutil.rmtree(src)  # a resumed run must not read its init_from again
  loop.train_and_evaluate(c, cut)
  a, b = _flat(final_params(cut)["params"]), _flat(final_params(ref)["params"])
  assert all(np.array_equal(a[p], b[p]) for p in b)
  # The whole run trained from the source: its trunk is not a fresh init's.
  fresh = str(tmp_path / "fresh")
  loop.train_and_evaluate(_chest(tmp_path), fresh)
  assert not np.allclose(b["ConvNormAct_0/Conv_0/kernel"],
                         _flat(final_params(fresh)["params"])["ConvNormAct_0/Conv_0/kernel"])


def test_mismatched_shapes_are_one_error_naming_each(source, tmp_path):
  src, _ = source
  workdir = str(tmp_path / "tuned")
  with pytest.raises(finetune.InitMismatchError) as raised:
    loop.train_and_evaluate(_chest(tmp_path, init_from=src, **{"model.kwargs.width": 16}),
                            workdir)
  message = str(raised.value)
  assert launch_module()._is_expected_error(raised.value)
  assert "\n" not in message and "init_skip" in message
  assert "params/Dense_0/kernel: checkpoint (16, 2), model (32, 14)" in message
  assert "params/ConvNormAct_0/Conv_0/kernel: checkpoint (3, 3, 1, 8), model (3, 3, 1, 16)" \
      in message
  assert "batch_stats/ConvNormAct_0/BatchNorm_0/mean: checkpoint (8,), model (16,)" in message
  # Refused before anything was written: the corrected command is not "another experiment".
  assert not os.path.exists(os.path.join(workdir, "config.json"))


@pytest.mark.parametrize("overrides, needle", [
    ({"init_skip": ("^Dense_9",)}, "init_skip: '^Dense_9' matches no parameter"),
    ({"optim.freeze": ("^trunk",)}, "optim.freeze: '^trunk' matches no parameter"),
    ({"init_subtree": "encoder"}, "nothing to load"),
])
def test_patterns_that_match_nothing_are_refused(source, tmp_path, overrides, needle):
  c = _chest(tmp_path, init_from=source[0], **overrides)
  with pytest.raises(ValueError) as raised:
    loop.train_and_evaluate(c, str(tmp_path / "tuned"))
  assert needle in str(raised.value)
  assert launch_module()._is_expected_error(raised.value)


def test_init_from_a_checkpoint_folder_or_nothing_usable(source, tmp_path):
  src, _ = source
  variables, where = finetune.read_source(os.path.join(src, "checkpoints", "2"))
  assert where.endswith(os.path.join("checkpoints", "2"))
  assert not np.array_equal(_flat(variables["params"])["Dense_0/kernel"],
                            _flat(final_params(src)["params"])["Dense_0/kernel"])
  with pytest.raises(MedjaxIOError, match="not a medjax run folder"):
    finetune.read_source(str(tmp_path))


def test_a_2d_run_initialises_a_slice_models_encoder(source, tmp_path):
  """A 2-D classifier trained on slices initialises the slice encoder of a volume model (another
  task, another model): its convolutions and statistics, its head left out."""
  from configs import adrenalmnist3d_lstm

  encoder = "small_cnn(features=(4, 8), stem_stride=2)"
  _, data = source
  src = str(tmp_path / "cnn2d")
  loop.train_and_evaluate(config(data, steps=2, **{"model.name": "small_cnn",
                                                   "model.kwargs": {"features": (4, 8),
                                                                    "stem_stride": 2}}), src)
  volumes = write_synthetic_medmnist(str(tmp_path / "vol"), flag="adrenalmnist3d", n_train=16,
                                     n_val=8, ndim=3)
  c = adrenalmnist3d_lstm.get_config("runlocal")
  c.data.dir, c.train.steps, c.train.batch_size, c.mesh.data = volumes, 2, 8, 1
  c.model.kwargs.encoder, c.model.kwargs.context = encoder, 0  # one channel per slice, as in 2-D
  c.init_from, c.init_subtree = src, "encoder"
  c.optim.freeze = ("^encoder/",)
  workdir = str(tmp_path / "lstm")
  loop.train_and_evaluate(c, workdir)
  before, after = _flat(final_params(src)["params"]), _flat(final_params(workdir)["params"])
  enc = {p.removeprefix("encoder/"): v for p, v in after.items() if p.startswith("encoder/")}
  assert enc and all(np.array_equal(v, before[p]) for p, v in enc.items())
  assert "Dense_0/kernel" in before and "Dense_0/kernel" not in enc
  stats_before = _flat(final_params(src)["batch_stats"])
  assert len(stats_before) == len([p for p in _flat(final_params(workdir)["batch_stats"])
                                   if p.startswith("encoder/")])


def test_select_maps_one_subtree_onto_another():
  """A slice model's encoder (``encoder/...`` in the source) into a 2-D classifier's root, its
  head left as initialised: the reverse direction of the test above, on plain arrays."""
  w = lambda *shape: np.zeros(shape, np.float32)
  source = {"params": {"encoder": {"ConvNormAct_0": {"Conv_0": {"kernel": w(3, 3, 1, 4) + 1}}},
                       "rnn_0": {"cell": {"kernel": w(8, 8)}}},
            "batch_stats": {"encoder": {"ConvNormAct_0": {"BatchNorm_0": {"mean": w(4) + 2}}}}}
  target = {"params": {"ConvNormAct_0": {"Conv_0": {"kernel": w(3, 3, 1, 4)}},
                       "Dense_0": {"kernel": w(4, 2)}},
            "batch_stats": {"ConvNormAct_0": {"BatchNorm_0": {"mean": w(4)}}}}
  chosen = finetune.select(target, source, "src", skip=("^Dense_0/",), from_subtree="encoder")
  assert set(chosen["params"]) == {"ConvNormAct_0/Conv_0/kernel"}
  assert (chosen["params"]["ConvNormAct_0/Conv_0/kernel"] == 1).all()
  assert (chosen["batch_stats"]["ConvNormAct_0/BatchNorm_0/mean"] == 2).all()
  with pytest.raises(finetune.InitMismatchError,
                     match=r"params/Dense_0/kernel: not in the checkpoint \(as encoder/Dense_0/"):
    finetune.select(target, source, "src", from_subtree="encoder")
