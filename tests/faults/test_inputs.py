"""Inputs with NaN/±inf voxels: refused (a row in errors.csv), or repaired on request, never a
silent answer, for the classifier, the U-Net and the segmentation run's own cases."""

import contextlib
import csv
import io
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from absl import flags
from conftest import write_msd

from medjax.infer import predict
from medjax.infer.trained import TrainedModel
from medjax.io import msd
from medjax.io.errors import MedjaxIOError


def _rows(path):
  with open(path, newline="") as f:
    return {r["input"]: r for r in csv.DictReader(f)}


def _save(path, array, affine=np.eye(4)):
  nib.save(nib.Nifti1Image(np.asarray(array, np.float32), affine), str(path))


@pytest.fixture(scope="module")
def cls_inbox(learned_run, tmp_path_factory):
  """A val image as float NIfTI: intact, with 5 NaN, with ±inf, all NaN, and with the NaN filled
  by hand the way ``--nonfinite=fill`` documents (its channel's finite minimum)."""
  workdir, _ = learned_run
  image = TrainedModel.load(workdir).source("val")[1]["image"][..., 0].T.astype(np.float32)
  folder = tmp_path_factory.mktemp("nonfinite") / "inbox"
  folder.mkdir()
  nan, inf = image.copy(), image.copy()
  nan[3:8, 10] = np.nan
  inf[0, :3], inf[5, 5] = np.inf, -np.inf
  by_hand = nan.copy()
  by_hand[np.isnan(by_hand)] = image[~np.isnan(nan)].min()
  for name, array in (("good", image), ("nan", nan), ("inf", inf), ("allnan", np.full_like(
      image, np.nan)), ("by_hand", by_hand)):
    _save(folder / f"{name}.nii.gz", array[:, :, None])
  return workdir, folder


def test_classifier_refuses_nonfinite_inputs_and_predicts_the_rest(cls_inbox, tmp_path):
  workdir, folder = cls_inbox
  fv = flags.FlagValues()
  predict.define_flags(fv)
  fv(["predict", f"--workdir={workdir}", f"--input={folder}", f"--output={tmp_path}"])
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    code = predict.main([], fv)
  assert code == predict.EXIT_SOME_FAILED
  errors = _rows(tmp_path / "errors.csv")
  assert set(errors) == {"nan.nii.gz", "inf.nii.gz", "allnan.nii.gz"}
  assert errors["nan.nii.gz"]["problem"].startswith("5 of 784 voxel values are not finite (5 NaN)")
  assert errors["inf.nii.gz"]["problem"].startswith("4 of 784 voxel values are not finite (3 +inf, 1 -inf)")
  assert "784 NaN" in errors["allnan.nii.gz"]["problem"]
  assert "--nonfinite=fill" in errors["nan.nii.gz"]["problem"]
  assert set(_rows(tmp_path / "predictions.csv")) == {"good.nii.gz", "by_hand.nii.gz"}
  assert sum("not finite" in line for line in stderr.getvalue().splitlines()) == 3


def test_classifier_fill_predicts_the_documented_repair_with_a_warning(cls_inbox, tmp_path):
  workdir, folder = cls_inbox
  with contextlib.redirect_stderr(io.StringIO()):
    summary = predict.predict(workdir, str(folder), str(tmp_path), nonfinite="fill",
                              progress=False)
  rows = _rows(tmp_path / "predictions.csv")
  assert set(rows) == {"good.nii.gz", "nan.nii.gz", "inf.nii.gz", "by_hand.nii.gz"}
  assert rows["good.nii.gz"]["warning"] == "" and rows["by_hand.nii.gz"]["warning"] == ""
  assert rows["nan.nii.gz"]["warning"].startswith("5 of 784 voxel values are not finite")
  assert "+inf to the finite maximum" in rows["inf.nii.gz"]["warning"]
  for key in ("prob_normal", "prob_pneumonia"):
    assert rows["nan.nii.gz"][key] == rows["by_hand.nii.gz"][key]
  # Nothing finite to fill from: still refused.
  assert [f.input for f in summary["failures"]] == ["allnan.nii.gz"]
  assert "no finite value" in summary["failures"][0].problem
  assert json.load(open(tmp_path / "predict.json"))["settings"]["nonfinite"] == "fill"


def test_segmentation_refuses_nonfinite_inputs_or_fills_them(seg_run, tmp_path):
  workdir, root = seg_run
  inbox = tmp_path / "inbox"
  inbox.mkdir()
  source = nib.load(os.path.join(root, "imagesTr", "case_000.nii.gz"))
  data = np.asarray(source.dataobj, np.float32)
  shutil.copy(source.get_filename(), inbox / "good.nii.gz")
  data[5:9, 5:9, 5:9] = np.nan
  data[10, 10, 10] = np.inf
  _save(inbox / "nan.nii.gz", data, source.affine)
  with contextlib.redirect_stderr(io.StringIO()):
    refused = predict.predict(workdir, str(inbox), str(tmp_path / "refuse"), mirror=False,
                              progress=False)
  [failure] = refused["failures"]
  assert failure.input == "nan.nii.gz"
  assert failure.problem.startswith("65 of ") and "(64 NaN, 1 +inf)" in failure.problem
  assert set(_rows(tmp_path / "refuse" / "predictions.csv")) == {"good.nii.gz"}
  assert not os.path.exists(tmp_path / "refuse" / "nan_seg.nii.gz")
  with contextlib.redirect_stderr(io.StringIO()):
    filled = predict.predict(workdir, str(inbox / "nan.nii.gz"), str(tmp_path / "fill"),
                             mirror=False, nonfinite="fill", progress=False)
  assert filled["failed"] == 0
  row = _rows(tmp_path / "fill" / "predictions.csv")["nan.nii.gz"]
  assert "not finite" in row["warning"] and os.path.isfile(tmp_path / "fill" / row["segmentation"])


def test_segmentation_cases_with_nonfinite_voxels_are_refused_naming_the_file(tmp_path):
  """The run's own cases (planning, training, `segment.validate`) are read by `load_msd_case`."""
  dataset = msd.read_msd_dataset(write_msd(tmp_path, n=1, shape=(8, 8, 8)))
  case = dataset.cases[0]
  image = nib.load(case.images[0])
  data = np.asarray(image.dataobj, np.float32)
  data[4, 4, 4] = np.nan
  _save(case.images[0], data, image.affine)
  with pytest.raises(MedjaxIOError, match=r"case_000\.nii\.gz: 1 of \d+ voxel values are not "
                     r"finite \(1 NaN\)"):
    msd.load_msd_case(dataset, case)
