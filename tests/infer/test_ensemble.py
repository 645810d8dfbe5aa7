"""Ensembles of segmentation runs: mean probabilities (of folds, and of a 2-D with a 3-D run),
identical preprocessing, fold folders."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import computed_once
from helpers import run_cli, seg_config

from medjax.infer import ensemble as ensemble_lib
from medjax.infer import predict, segment
from medjax.infer.trained import read_run_plan
from medjax.io import msd as msd_lib
from medjax.io.errors import MedjaxIOError


@pytest.fixture(scope="session")
def run_2d(cv_runs, tmp_path_factory):
  """A 2-D U-Net run on `cv_runs`'s data, trained as its ``fold0`` (same fold, hold-out, batch,
  lr and steps) but slice by slice: the 2-D member of a 2-D + 3-D ensemble. Made once
  (`computed_once`); tests only read it."""
  _, msd_root = cv_runs

  def train(root):
    from medjax.train import loop

    workdir = os.path.join(root, "run2d")
    loop.train_and_evaluate(seg_config(msd_root, steps=2, dims=2, **{
        "data.folds": 2, "data.fold": 0, "data.holdout": ("case_006",), "train.batch_size": 2,
        "optim.lr": 1e-2}), workdir)
    return workdir

  return computed_once(tmp_path_factory, "ensemble_run_2d", train)


def _image(msd_root, case="case_006"):
  dataset = msd_lib.read_msd_dataset(msd_root)
  image, _ = msd_lib.load_msd_case(dataset, dataset.case(case))
  return image


def test_an_ensemble_of_two_runs_is_the_mean_of_their_probabilities(cv_runs):
  folder, msd_root = cv_runs
  image = _image(msd_root)
  runs = ensemble_lib.fold_runs(folder)
  assert [os.path.basename(r) for r in runs] == ["fold0", "fold1"]
  members = [segment.Segmenter(r).predict(image, mirror=True) for r in runs]
  model = ensemble_lib.load_segmenter(folder)  # the folder stands for its folds
  assert isinstance(model, ensemble_lib.Ensemble) and model.workdirs == runs
  mean = model.predict(image, mirror=True)
  assert mean.array.shape == image.shape + (3,)
  np.testing.assert_allclose(mean.affine, image.affine)
  np.testing.assert_allclose(mean.array, (members[0].array + members[1].array) / 2, atol=1e-5)
  assert np.abs(members[0].array - members[1].array).max() > 1e-3  # two different models


def test_a_run_with_other_preprocessing_is_refused(cv_runs, tmp_path):
  folder, _ = cv_runs
  other = str(tmp_path / "other")
  shutil.copytree(os.path.join(folder, "fold1"), other)
  plan_path = os.path.join(other, "plan.json")
  plan = json.load(open(plan_path))
  plan["target_spacing"] = [2.0, 2.0, 2.0]
  json.dump(plan, open(plan_path, "w"))
  runs = [os.path.join(folder, "fold0"), other]
  with pytest.raises(MedjaxIOError, match="plan.json: preprocesses differently.*target_spacing"):
    ensemble_lib.Ensemble(runs)
  code, _, err = run_cli(predict, f"--workdir={','.join(runs)}", f"--input={tmp_path}",
                         f"--output={tmp_path / 'out'}")
  assert code == predict.EXIT_UNUSABLE
  assert err.count("\n") == 1 and "target_spacing: [1.0, 1.0, 1.0] vs [2.0, 2.0, 2.0]" in err


def test_a_cross_validation_folder_must_hold_one_configs_folds(cv_runs, tmp_path):
  folder, _ = cv_runs
  copy = tmp_path / "cv"
  for fold in ("fold0", "fold1"):
    os.makedirs(copy / fold)
    shutil.copy(os.path.join(folder, fold, "config.json"), copy / fold)
  assert len(ensemble_lib.fold_runs(str(copy))) == 2
  config = json.load(open(copy / "fold1" / "config.json"))
  config["seed"] += 1  # folds may start from their own seeds
  json.dump(config, open(copy / "fold1" / "config.json", "w"))
  assert len(ensemble_lib.fold_runs(str(copy))) == 2
  config["optim"]["lr"] = 0.5
  json.dump(config, open(copy / "fold1" / "config.json", "w"))
  with pytest.raises(MedjaxIOError, match="fold1: its config differs .* in optim.lr"):
    ensemble_lib.fold_runs(str(copy))
  shutil.rmtree(copy / "fold1")
  with pytest.raises(MedjaxIOError, match="fold.s. 1 of 2 missing"):
    ensemble_lib.fold_runs(str(copy))
  with pytest.raises(MedjaxIOError, match="no segmentation runs"):
    ensemble_lib.fold_runs(str(tmp_path))


def test_a_2d_and_a_3d_run_ensemble_by_their_mean_probabilities(cv_runs, run_2d, tmp_path):
  folder, msd_root = cv_runs
  runs = [run_2d, os.path.join(folder, "fold0")]
  plans = [read_run_plan(r) for r in runs]
  assert [p["dims"] for p in plans] == [2, 3]  # one of each; their preprocessing is the same
  assert ensemble_lib.preprocessing_mismatch(*plans) == []
  model = ensemble_lib.Ensemble(runs)
  assert model.workdirs == runs and [m.plan["dims"] for m in model.members] == [2, 3]
  image = _image(msd_root)
  # Each member's own predict: the 2-D one slice by slice, the 3-D one by patches.
  members = [m.predict(image, mirror=True) for m in model.members]
  assert np.abs(members[0].array - members[1].array).max() > 1e-3  # so the mean is a real check
  mean = model.predict(image, mirror=True)
  assert mean.array.shape == image.shape + (3,)
  np.testing.assert_allclose(mean.affine, image.affine)
  np.testing.assert_allclose(mean.array, (members[0].array + members[1].array) / 2, atol=1e-5)
  labels = ensemble_lib.labels_of(mean, model.plan).array[..., 0]
  np.testing.assert_array_equal(labels, np.argmax(mean.array, -1))

  # The command line, given both runs and a NIfTI file, writes that argmax on the file's grid.
  source = os.path.join(msd_root, "imagesTr", "case_006.nii.gz")
  inbox = tmp_path / "inbox"
  inbox.mkdir()
  shutil.copy(source, inbox / "case.nii.gz")
  code, _, err = run_cli(predict, f"--workdir={','.join(runs)}", f"--input={inbox}",
                         f"--output={tmp_path / 'out'}")
  assert code == predict.EXIT_OK, err
  written = nib.load(str(tmp_path / "out" / "case_seg.nii.gz"))
  np.testing.assert_allclose(written.affine, nib.load(source).affine, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
