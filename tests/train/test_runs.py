"""The finished-run marker: training's summary, and for segmentation the validation's too."""

import json

from medjax.train import runs


def _config(tmp_path, task):
  (tmp_path / "config.json").write_text(json.dumps({"task": task}))


def test_a_classification_run_is_finished_by_its_training_summary(tmp_path):
  _config(tmp_path, "classification")
  assert not runs.is_finished(str(tmp_path))
  runs.mark_finished(str(tmp_path), {"best": {"auc": 0.9}})
  assert runs.is_finished(str(tmp_path))
  assert runs.read_summary(str(tmp_path)) == {"best": {"auc": 0.9}}


def test_a_segmentation_run_also_needs_its_validation(tmp_path):
  _config(tmp_path, "segmentation")
  runs.mark_finished(str(tmp_path), {"best": {"dice": 0.8}})
  assert not runs.is_finished(str(tmp_path))
  runs.mark_finished(str(tmp_path), {"foreground_dice": 0.85}, runs.VALIDATION)
  assert runs.is_finished(str(tmp_path))
  assert runs.read_summary(str(tmp_path), runs.VALIDATION) == {"foreground_dice": 0.85}


def test_no_config_is_not_finished(tmp_path):
  runs.mark_finished(str(tmp_path), {})
  assert not runs.is_finished(str(tmp_path))
  assert runs.is_finished(str(tmp_path), {"task": "classification"})
