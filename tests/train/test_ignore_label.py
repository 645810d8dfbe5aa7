"""The ignore label: voxels declared "not annotated" count in no loss, gradient or metric."""

import json
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import write_msd
from helpers import seg_config

from medjax.metrics import postprocessing as pp
from medjax.metrics import segmentation as seg_metrics
from medjax.metrics import selection
from medjax.planning import make_plan
from medjax.train import loop, losses, tasks

IGNORE = 3


def _batch(seed=0, shape=(2, 8, 8, 8)):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, shape)
  ignored = rng.random(shape) < 0.3
  labels[ignored] = IGNORE
  logits = rng.normal(size=shape + (3,)).astype(np.float32)
  return jnp.asarray(labels), jnp.asarray(logits), ignored


@pytest.mark.parametrize("batch_dice", [True, False])
def test_ignored_voxels_change_neither_the_loss_nor_its_gradient(batch_dice):
  labels, logits, ignored = _batch()

  def loss(x, ignore_label=IGNORE):
    return losses.dice_ce_loss(x, labels, batch_dice=batch_dice, ignore_label=ignore_label)

  value, grad = jax.value_and_grad(loss)(logits)
  assert np.all(np.asarray(grad)[ignored] == 0.0)  # no gradient where nothing is annotated
  assert np.abs(np.asarray(grad)[~ignored]).max() > 0
  noise = np.where(ignored[..., None], np.random.default_rng(1).normal(size=logits.shape) * 5, 0)
  other = logits + jnp.asarray(noise, jnp.float32)  # anything predicted where ignored
  value2, grad2 = jax.value_and_grad(loss)(other)
  assert float(value2) == pytest.approx(float(value), rel=1e-6)
  np.testing.assert_allclose(np.asarray(grad2), np.asarray(grad), atol=1e-7)
  # Without the ignore label the same change does move the loss: the test can fail.
  assert float(loss(other, None)) != pytest.approx(float(loss(logits, None)), rel=1e-4)


def test_the_segmentation_task_ignores_them_at_every_deep_supervision_head():
  labels, logits, ignored = _batch(2)
  task = tasks.segmentation(ignore_label=IGNORE)
  batch = {"label": labels[..., None]}
  half = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 4, 3)), jnp.float32)
  grads = jax.grad(lambda x: task.loss_fn([x, half], batch))(logits)
  assert np.all(np.asarray(grads)[ignored] == 0.0)
  preds = np.argmax(np.asarray(logits), -1)
  changed = np.where(ignored, (preds + 1) % 3, preds)
  assert task.metrics_fn(np.asarray(labels), preds) == task.metrics_fn(np.asarray(labels), changed)
  assert "dice_3" not in task.metrics_fn(np.asarray(labels), preds)


def test_ignored_voxels_change_no_metric_or_post_processing_decision():
  labels, logits, ignored = _batch(4, (1, 16, 16, 16))
  ref = np.asarray(labels)[0]
  pred = np.argmax(np.asarray(logits), -1)[0]
  changed = np.where(ignored[0], (pred + 1) % 3, pred)
  a = seg_metrics.segmentation_metrics(pred, ref, (1, 1, 1), [1, 2], IGNORE)
  b = seg_metrics.segmentation_metrics(changed, ref, (1, 1, 1), [1, 2], IGNORE)
  assert a == b
  assert a != seg_metrics.segmentation_metrics(changed, ref, (1, 1, 1), [1, 2])
  assert selection.pseudo_dice(ref, pred, IGNORE) == selection.pseudo_dice(ref, changed, IGNORE)
  d1 = pp.determine_postprocessing([pred], [ref], [1, 2], IGNORE)
  d2 = pp.determine_postprocessing([changed], [ref], [1, 2], IGNORE)
  assert d1["dice_before"] == d2["dice_before"]


def test_a_label_named_ignore_is_planned_as_the_ignore_label(tmp_path):
  fp = {"spacings": [[1.0, 1.0, 1.0]], "median_spacing": [1.0, 1.0, 1.0],
        "median_shape": [20, 20, 20], "channels": ["MRI"], "foreground_intensity": [{}],
        "class_names": ["background", "outer", "core", "ignore"]}
  plan = make_plan(fp)
  assert (plan["num_classes"], plan["ignore_label"]) == (3, 3)
  assert plan["class_names"] == ["background", "outer", "core"]
  assert make_plan({**fp, "class_names": ["background", "outer"]})["ignore_label"] is None
  with pytest.raises(ValueError, match="'ignore' is 1; it must be the highest label value"):
    make_plan({**fp, "class_names": ["background", "ignore", "core"]})

  # A dataset that declares it: the loop's task gets it and the network predicts 3 classes.
  root = write_msd(str(tmp_path / "msd"), n=5)
  meta = json.load(open(os.path.join(root, "dataset.json")))
  meta["labels"]["3"] = "ignore"
  json.dump(meta, open(os.path.join(root, "dataset.json"), "w"))
  for case in range(5):  # an unannotated slab in every case
    path = os.path.join(root, "labelsTr", f"case_{case:03d}.nii.gz")
    image = nib.load(path)
    seg = np.asarray(image.dataobj).copy()
    seg[:, :, :4] = IGNORE
    nib.save(nib.Nifti1Image(seg, image.affine), path)
  data = loop.build_data(seg_config(root), str(tmp_path / "run"))
  assert data.num_classes == 3 and data.task_kwargs == {"ignore_label": 3, "regions": None}
  record = data.train[0]
  assert IGNORE in np.asarray(record["label"])  # kept in the cache, for the loss to skip
  assert set(np.unique(record["locations"][:, 0])) <= {1, 2}  # never oversampled
