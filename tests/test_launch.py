"""``python launch.py`` on bad input: exit status 2, one ``error: ...`` line that names the
problem, no traceback, and nothing already saved in the workdir touched."""

import hashlib
import os

import numpy as np
import pytest
from conftest import write_synthetic_medmnist
from helpers import config, launch_module, run_launch, tail

from medjax.io.errors import MedjaxIOError
from medjax.train import loop

STEPS = 2


def _run(workdir, data_dir, *extra):
  """launch.py on the runlocal config for ``STEPS`` steps on one device, as ``helpers.config``;
  ``(returncode, output)``."""
  return run_launch(str(workdir), [f"--config.data.dir={data_dir}",
                                   f"--config.train.steps={STEPS}", "--config.mesh.data=1",
                                   *extra], timeout=300)


def _error_line(returncode, out):
  """Checks the CLI's answer to an expected error and returns its ``error:`` line."""
  assert returncode == 2, f"exit status {returncode}:\n{tail(out)}"
  assert "Traceback" not in out, tail(out, 60)
  errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
  assert len(errors) == 1, tail(out)
  return errors[0]


def _snapshot(workdir):
  """``{relative path: sha1}`` of every file under ``workdir``."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = hashlib.sha1(f.read()).hexdigest()
  return files


# ---------------------------------------------------------------------------------------------
# Bad data files. Each builder turns a good synthetic file into a bad one in place.
# ---------------------------------------------------------------------------------------------

def _missing(path):
  os.remove(path)


def _random_bytes(path):
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))


def _truncated(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _resave(path, **changes):
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays.update(changes)
  np.savez_compressed(path, **arrays)


def _two_label_columns(path):
  with np.load(path) as npz:
    labels = npz["train_labels"]
  _resave(path, train_labels=np.concatenate([labels, labels], axis=1))


def _too_few_labels(path):
  with np.load(path) as npz:
    labels = npz["val_labels"]
  _resave(path, val_labels=labels[:-3])


def _images_32(path):
  with np.load(path) as npz:
    images = npz["train_images"]
  _resave(path, train_images=np.pad(images, ((0, 0), (2, 2), (2, 2))))


BAD_DATA = {
    "missing": (_missing, "no such file"),
    "random_bytes": (_random_bytes, "not an .npz archive"),
    "truncated": (_truncated, "truncated or corrupt"),
    "label_columns": (_two_label_columns, "'train_labels' has shape (96, 2)"),
    "label_count": (_too_few_labels, "'val_labels' holds 37 labels but 'val_images' holds 40"),
    "image_size": (_images_32, "'train_images' has spatial shape (32, 32); expected (28, 28)"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file_names_the_file(case, tmp_path):
  spoil, cause = BAD_DATA[case]
  data = write_synthetic_medmnist(str(tmp_path))
  path = os.path.join(data, "pneumoniamnist.npz")
  spoil(path)
  # The reader's own error type (checked in-process, cheaply: no training starts).
  with pytest.raises(MedjaxIOError) as raised:
    loop.build_data(config(data), str(tmp_path / "unused"))
  assert raised.value.path == path and cause in raised.value.cause, str(raised.value)
  line = _error_line(*_run(tmp_path / "run", data))
  assert line == f"error: {raised.value}"


def test_non_positive_steps_are_refused(synthetic_medmnist, tmp_path):
  line = _error_line(*_run(tmp_path / "run", synthetic_medmnist, "--config.train.steps=-3"))
  assert line == "error: train.steps must be positive, got -3", line


@pytest.mark.parametrize("case", ["steps", "missing_data"])
def test_a_refused_run_leaves_no_workdir_behind(case, synthetic_medmnist, tmp_path):
  workdir = str(tmp_path / "run")
  if case == "steps":
    c, error = config(synthetic_medmnist, steps=-3), ValueError
  else:
    c, error = config(str(tmp_path / "empty")), MedjaxIOError
  with pytest.raises(error):
    loop.train_and_evaluate(c, workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))


@pytest.fixture
def saved_run(synthetic_medmnist, tmp_path):
  """A finished ``STEPS``-step run (in-process: cheaper than a launch) and its file hashes."""
  workdir = str(tmp_path / "saved")
  loop.train_and_evaluate(config(synthetic_medmnist, steps=STEPS), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  return workdir, _snapshot(workdir)


def test_workdir_of_another_experiment_names_the_keys(saved_run, synthetic_medmnist):
  workdir, before = saved_run
  line = _error_line(*_run(workdir, synthetic_medmnist, "--config.optim.lr=0.5"))
  # Exactly the one differing key: the CLI builds the same config as the in-process run.
  assert line.startswith(f"error: {workdir} holds a run with a different config "
                         f"(optim.lr: {config(synthetic_medmnist).optim.lr} → 0.5); "), line
  assert _snapshot(workdir) == before


def test_corrupt_data_on_resume_keeps_the_saved_run(saved_run, synthetic_medmnist):
  workdir, before = saved_run
  path = os.path.join(synthetic_medmnist, "pneumoniamnist.npz")
  _truncated(path)
  line = _error_line(*_run(workdir, synthetic_medmnist))
  assert line.startswith(f"error: {path}: not a readable .npz archive"), line
  assert _snapshot(workdir) == before


def test_diverged_run_names_the_step_and_the_last_checkpoint(synthetic_medmnist, tmp_path):
  line = _error_line(*_run(tmp_path / "run", synthetic_medmnist, "--config.optim.lr=1e12",
                           "--config.optim.warmup_fraction=0.0", "--config.eval.every_steps=1",
                           "--config.train.steps=40"))
  assert "Last good checkpoint: step" in line and "not finite" in line, line


def test_only_expected_errors_lose_their_traceback():
  launch = launch_module()

  def raised(fn):
    try:
      fn()
    except Exception as e:  # the exception with its traceback, as launch.main sees it
      return e
    raise AssertionError("no exception")

  def bad_steps():
    loop.resolve_steps(config("", steps=-3).train, 10)

  def numpy_value_error():
    np.zeros(3).reshape(2)

  def raise_(e):
    raise e

  assert launch._is_expected_error(raised(bad_steps))  # raised by medjax: a setting
  assert launch._is_expected_error(raised(lambda: raise_(MedjaxIOError("/x.npz", "corrupt"))))
  assert not launch._is_expected_error(raised(numpy_value_error))  # a bug: keep the traceback
  assert not launch._is_expected_error(raised(lambda: raise_(RuntimeError("bug"))))
