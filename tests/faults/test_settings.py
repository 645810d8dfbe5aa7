"""Bad settings (issue 25): each is refused before training with one line naming the key, the
value and what is accepted; nothing is written to the workdir.

One subprocess test holds the CLI contract (exit status 2, one ``error:`` line, no traceback, no
workdir); the rest check in-process that the check raises an error naming the key and that
``launch._is_expected_error`` gives it that one line.
"""

import glob
import importlib
import os
import subprocess
import warnings

import numpy as np
import pytest
from absl import flags
from conftest import REPO, write_synthetic_medmnist
from helpers import apply_overrides, config, launch_cmd, launch_module, run_launch, tail
from ml_collections import config_flags

from configs import hippocampus_unet3d
from medjax.data import sources
from medjax.train import loop, settings, sharding, tasks


def _raised(fn, error=ValueError):
  """The exception ``fn()`` raises, with its traceback (as launch.main sees it)."""
  with pytest.raises(error) as raised:
    fn()
  return raised.value


def _refused(c, *needles):
  """``settings.check(c)`` refuses with a message holding every needle, as an expected error."""
  e = _raised(lambda: settings.check(c))
  assert all(n in str(e) for n in needles), str(e)
  assert launch_module()._is_expected_error(e)
  return str(e)


# ---------------------------------------------------------------------------------------------
# The CLI contract.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, line", [
    ("--config.train.stepz=5",  # unknown key: raised by ml_collections while absl parses
     "error: --config.train.stepz: the config has no such setting "
     "(did you mean --config.train.steps?)"),
    ("--config.train.batch_size=big",  # wrong type: absl's flags.Error
     "error: --config.train.batch_size=big: not a valid value for this setting "
     "(invalid literal for int() with base 10: 'big')"),
    ("--config.model.name=resnet999",  # refused by the loop's settings.check
     "error: model.name='resnet999' is unknown; known: dense_fusion, resnet18, "),
])
def test_bad_setting_is_one_error_line_and_exit_2(flag, line, tmp_path):
  data = write_synthetic_medmnist(str(tmp_path))
  workdir = str(tmp_path / "run")
  returncode, out = run_launch(workdir, [f"--config.data.dir={data}", flag], timeout=120)
  assert returncode == 2, tail(out)
  assert "Traceback" not in out, tail(out, 60)
  errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith(line), tail(out)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("config_arg, line", [
    ("configs/nosuch.py", "error: --config=configs/nosuch.py: no such file"),
    ("configs/pneumoniamnist_resnet18.py:runlocl",
     "error: --config=configs/pneumoniamnist_resnet18.py: ValueError: unknown config variant(s) "
     "['runlocl']; known: runlocal, search"),
])
def test_a_config_file_or_variant_that_is_not_there_is_one_error_line(config_arg, line, tmp_path):
  workdir = str(tmp_path / "run")
  done = subprocess.run(launch_cmd(workdir, config_file=config_arg), cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and done.stderr.splitlines()[-1] == line, tail(done.stderr)
  assert "Traceback" not in done.stderr and not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------------
# --config.<key> overrides: unknown keys and wrong types, as launch.py's flag parser reports them.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, message", [
    ("--config.train.stepz=5",
     "--config.train.stepz: the config has no such setting (did you mean --config.train.steps?)"),
    ("--config.trainz.steps=5",
     "--config.trainz.steps: the config has no such setting (did you mean --config.train.steps?)"),
    ("--config.model.kwargs.widht=8", "--config.model.kwargs.widht: the config has no such "
     "setting (did you mean --config.model.kwargs.width?)"),
    ("--config.train.batch_size=big", "--config.train.batch_size=big: not a valid value for this "
     "setting (invalid literal for int() with base 10: 'big')"),
    ("--config.optim.lr=fast", "--config.optim.lr=fast: not a valid value for this setting "
     "(could not convert string to float: 'fast')"),
])
def test_bad_override_names_the_flag(flag, message):
  argv = ["launch.py", f"--config={os.path.join(REPO, 'configs/pneumoniamnist_resnet18.py')}",
          flag]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  with warnings.catch_warnings():  # ml_collections loads the file with the old load_module()
    warnings.simplefilter("ignore", DeprecationWarning)
    e = _raised(lambda: values(argv), Exception)
  assert launch_module()._override_error(e, argv) == message
  assert launch_module()._override_error(RuntimeError("x"), argv) is None  # not a setting


# ---------------------------------------------------------------------------------------------
# settings.check: what needs no data.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, known", [
    ("model.name", "resnet999", "dense_fusion, resnet18, resnet18_2p5d"),
    ("task", "detection", "classification, fusion, multilabel_classification, segmentation"),
    ("optim.name", "lamb", "adamw, sgd"),
    ("data.source", "dicomdir", "medmnist, msd, harvard"),
    ("train.precision", "fp16", "float32, bf16"),
])
def test_unknown_name_lists_the_known_ones(key, value, known):
  _refused(config("", **{key: value}), f"{key}={value!r}", known)


@pytest.mark.parametrize("key, value, wanted", [
    ("train.batch_size", 0, ">= 1"),
    ("eval.batch_size", 0, ">= 1"),
    ("optim.lr", -1.0, "> 0"),
    ("optim.lr", 0.0, "> 0"),
    ("optim.lr", float("nan"), "a finite number > 0"),
    ("optim.lr", float("inf"), "a finite number > 0"),
    ("optim.weight_decay", -1e-4, ">= 0"),
    ("optim.warmup_fraction", 1.5, "in [0, 1]"),
    ("optim.warmup_fraction", -0.1, "in [0, 1]"),
    ("optim.end_lr_factor", -0.5, "in [0, 1]"),
    ("optim.momentum", 1.0, "in [0, 1)"),
    ("optim.grad_clip_norm", -1.0, ">= 0"),
    ("train.keep_checkpoints", 0, ">= 1"),
    ("train.label_smoothing", 1.0, "in [0, 1)"),
    ("train.ema_decay", 1.0, "in [0, 1)"),
    ("train.mixup", -0.2, ">= 0"),
    ("train.min_steps", -1, ">= 0"),
    ("train.bn_recalibration_batches", -1, ">= 0"),
    ("eval.every_steps", -5, ">= 0"),
    ("data.workers", -2, ">= -1"),
])
def test_impossible_number_is_refused(key, value, wanted):
  message = _refused(config("", **{key: value}))
  assert message == f"{key} must be {wanted}, got {value!r}"


def test_every_shipped_config_passes():
  """No false refusals: each experiment in configs/ (and its runlocal variant) is accepted."""
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if name in ("common", "__init__"):
      continue
    module = importlib.import_module(f"configs.{name}")
    settings.check(module.get_config())
  settings.check(config(""))  # the tests' runlocal config


def test_segmentation_settings_are_refused_where_they_cannot_work():
  seg = hippocampus_unet3d.get_config
  _refused(apply_overrides(seg(), {"data.fold": 5}), "data.fold=5", "0 to 4")
  _refused(apply_overrides(seg(), {"data.folds": 1}), "data.folds must be >= 2")
  _refused(apply_overrides(seg(), {"train.mixup": 0.2}), "train.mixup", "not segmentation")
  _refused(apply_overrides(seg(), {"data.source": "medmnist"}), "task='segmentation'",
           "data.source=msd")
  _refused(config("", task="segmentation"), "cannot train on data.source='medmnist'")


# ---------------------------------------------------------------------------------------------
# settings.check_data: what needs the data (task metrics, split sizes).
# ---------------------------------------------------------------------------------------------

def _check_data(task="classification", num_classes=2, train=96, evals=40, **overrides):
  c = config("", **overrides)
  return lambda: settings.check_data(c, tasks.get_task(task), num_classes, train, evals)


def test_best_metric_must_be_one_the_task_reports():
  e = _raised(_check_data(**{"eval.best_metric": "nosuchmetric"}))
  assert str(e) == ("eval.best_metric='nosuchmetric': the classification task reports acc, "
                    "auc, nll; select on one of acc, auc")
  assert launch_module()._is_expected_error(e)
  # Kept where highest: a lower-is-better metric would keep the worst checkpoint.
  e = _raised(_check_data(**{"eval.best_metric": "nll"}))
  assert "lower is better" in str(e), str(e)
  # Segmentation reports Dice per foreground class of its plan, not AUC.
  e = _raised(_check_data("segmentation", 3, **{"eval.best_metric": "auc"}))
  assert "the segmentation task reports dice, dice_1, dice_2;" in str(e), str(e)
  _check_data("segmentation", 3, **{"eval.best_metric": "dice_2"})()


def test_metric_names_are_the_keys_the_tasks_report():
  labels, probs = np.array([0, 1, 0, 1]), np.array([[.8, .2], [.3, .7], [.6, .4], [.1, .9]])
  for name in ("classification", "multilabel_classification"):
    y, p = (labels, probs) if name == "classification" else (np.eye(2)[labels], probs)
    task = tasks.get_task(name)
    assert tuple(task.metrics_fn(y, p)) == task.metric_names(2)
  seg = tasks.get_task("segmentation")
  maps = np.array([[0, 1, 2, 2]])
  assert tuple(seg.metrics_fn(maps, maps)) == seg.metric_names(3)


def test_train_batch_larger_than_the_training_split_is_refused():
  e = _raised(_check_data(train=12, **{"train.batch_size": 16}))
  assert str(e).startswith("train.batch_size=16 is more than the 12 records"), str(e)


def test_empty_val_split_is_refused_before_anything_is_written(tmp_path):
  data = write_synthetic_medmnist(str(tmp_path), n_val=0)
  workdir = tmp_path / "run"
  e = _raised(lambda: loop.train_and_evaluate(config(data), str(workdir)))
  assert str(e).startswith("eval.split='val': the split pneumoniamnist_28:val holds no records")
  assert launch_module()._is_expected_error(e)
  assert not os.path.exists(workdir)


def test_unknown_best_metric_is_refused_before_anything_is_written(synthetic_medmnist, tmp_path):
  workdir = tmp_path / "run"
  e = _raised(lambda: loop.train_and_evaluate(
      config(synthetic_medmnist, **{"eval.best_metric": "nosuchmetric"}), str(workdir)))
  assert "eval.best_metric='nosuchmetric'" in str(e)
  assert launch_module()._is_expected_error(e)
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------------
# eval.batch_size larger than the split: capped, not padded (100,000 filled the host's memory).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("devices, records, batch", [(1, 40, 40), (4, 42, 44)])
def test_eval_batches_are_capped_by_the_split(devices, records, batch):
  labels = np.arange(records) % 2
  source = sources.ArraySource(np.zeros((records, 2, 2, 1), np.uint8), labels)
  seen = []

  def eval_step(state, b):  # a perfect classifier that records the batch it was given
    seen.append(b["image"].shape[0])
    y = np.asarray(b["label"])
    return np.eye(2)[y], y, np.asarray(b["mask"])

  metrics, y, _ = loop.evaluate(None, eval_step, source, [], 10_000,
                                sharding.make_mesh(devices), tasks.get_task("classification"))
  assert seen == [batch]  # the configured 10,000 would have been padded to 10,000
  assert len(y) == records and metrics["acc"] == 1.0
