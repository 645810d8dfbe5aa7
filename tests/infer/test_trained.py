"""A finished run loads back from its workdir and predicts what the loop evaluated."""

import jax
import numpy as np
import pytest

from medjax.data import pipeline
from medjax.evaluate import metrics
from medjax.infer.trained import TrainedModel
from medjax.io.errors import MedjaxIOError


@pytest.fixture(scope="module")
def run(learned_run):
  """The shared learnt run: trained on all 4 fake devices (its checkpoints sharded over them)."""
  return learned_run


def test_loads_the_best_checkpoint_onto_one_device_and_reproduces_the_loops_metrics(run):
  workdir, summary = run
  trained = TrainedModel.load(workdir)
  assert trained.step == summary["best_step"]
  assert trained.class_names == ("normal", "pneumonia")
  leaf = jax.tree.leaves(trained.variables)[0]
  assert len(leaf.devices()) == 1  # saved from a 4-device mesh, loaded onto one
  pred = trained.predict(trained.source("val"), progress=False)
  assert sorted(pred["index"]) == list(range(40))
  got = metrics.classification_metrics(pred["label"].reshape(-1), pred["probs"])
  assert got["auc"] == pytest.approx(summary["best"]["auc"], abs=1e-6)
  assert got["acc"] == pytest.approx(summary["best"]["acc"], abs=1e-6)
  np.testing.assert_allclose(pred["probs"].sum(1), 1.0, atol=1e-5)


def test_predict_images_pads_the_last_batch_and_matches_predict(run):
  trained = TrainedModel.load(run[0])
  src = trained.source("test")
  pred = trained.predict(src, batch_size=16, progress=False)
  whole = next(pipeline.eval_batches(src, trained.eval_transforms(), global_batch_size=len(src)))
  probs = trained.predict_images(whole["image"][:13], batch_size=8)  # 8 + 5 padded to 8
  assert probs.shape == (13, 2)
  np.testing.assert_allclose(probs, pred["probs"][:13], atol=1e-5)


def test_a_workdir_without_a_run_names_the_missing_file(tmp_path):
  with pytest.raises(MedjaxIOError, match="config.json"):
    TrainedModel.load(str(tmp_path))


def test_probabilities_average_the_flips_the_run_evaluated_with(run):
  tta = TrainedModel.load(run[0])
  assert tuple(tta.config.eval.flip_axes) == (1,)  # the PneumoniaMNIST config's left-right flip
  plain = TrainedModel.load(run[0])
  plain.config.eval.flip_axes = ()
  src = plain.source("val")
  images = next(pipeline.eval_batches(src, plain.eval_transforms(), global_batch_size=8))["image"]
  expected = (plain.predict_images(images) + plain.predict_images(images[:, :, ::-1])) / 2
  np.testing.assert_allclose(tta.predict_images(images), expected, atol=1e-6)
  assert np.max(np.abs(plain.predict_images(images) - expected)) > 1e-4  # the flip mattered
