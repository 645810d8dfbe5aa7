"""Cross-validation report, post-processing decision, hold-out, and predict with a CV folder."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from helpers import clear_holdout, run_cli
from scipy import ndimage

from medjax import planning
from medjax.evaluate import crossval
from medjax.infer import ensemble as ensemble_lib
from medjax.infer import predict
from medjax.io import msd
from medjax.io.errors import MedjaxIOError
from medjax.metrics import postprocessing as pp
from medjax.metrics import segmentation as seg_metrics
from medjax.planning.preprocessing import preprocess, restore_geometry


@pytest.fixture(scope="module")
def evaluated(cv_runs, tmp_path_factory):
  """A copy of the cross-validation folder after `evaluate_cv` and `evaluate_holdout`."""
  folder, msd_root = cv_runs
  copy = str(tmp_path_factory.mktemp("cv") / "cv")
  shutil.copytree(folder, copy)
  result = crossval.evaluate_cv(copy, n_boot=50)
  held = crossval.evaluate_holdout(copy, n_boot=50, mirror=False)
  return copy, msd_root, result, held


def test_every_training_case_is_scored_out_of_fold(evaluated):
  folder, msd_root, result, _ = evaluated
  splits = [json.load(open(os.path.join(folder, f"fold{k}", "splits.json"))) for k in range(2)]
  assert splits[0] == splits[1]
  val = [c for s in splits[0] for c in s["val"]]
  # data.holdout: case_006 is in no fold; the six others are each predicted by one fold.
  assert sorted(val) == [f"case_{k:03d}" for k in range(6)] and result["cases"] == 6
  out = os.path.join(folder, "crossval")
  assert sorted(os.listdir(os.path.join(out, "predictions"))) == [f"{c}.nii.gz" for c in
                                                                  sorted(val)]
  cases = []
  for fold, split in enumerate(splits[0]):
    for case in split["val"]:
      pred = nib.load(os.path.join(out, "predictions", f"{case}.nii.gz"))
      written = nib.load(os.path.join(folder, f"fold{fold}", "validation", f"{case}.nii.gz"))
      np.testing.assert_array_equal(np.asarray(pred.dataobj), np.asarray(written.dataobj))
      ref = nib.load(os.path.join(msd_root, "labelsTr", f"{case}.nii.gz"))
      assert pred.shape == ref.shape
      np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
      cases.append(seg_metrics.segmentation_metrics(
          np.asarray(pred.dataobj), np.asarray(ref.dataobj), ref.header.get_zooms()[:3], [1, 2]))
  expected = seg_metrics.summarize(cases)
  assert result["raw"]["per_class"]["outer"]["dice"] == pytest.approx(expected.mean[1]["dice"])
  assert result["raw"]["foreground_dice"] == pytest.approx(expected.foreground_dice)
  for metric in ("dice", "hd95"):
    for iv in result["raw"][f"{metric}_ci95"].values():
      assert iv["lo"] <= iv["value"] <= iv["hi"]
  text = open(os.path.join(out, "results.md")).read()
  assert "HD95 (mm)" in text and "Post-processing" in text
  rows = open(os.path.join(out, "results.csv")).read().splitlines()
  assert rows[0] == "case,fold,postprocessed,class,dice,iou,hd95,msd" and len(rows) == 1 + 24


def test_the_post_processing_decision_is_written_and_applied_to_the_oof_predictions(evaluated):
  folder, msd_root, result, _ = evaluated
  decision = pp.read_decision(os.path.join(folder, "postprocessing.json"))
  assert decision["keep_largest"] == result["postprocessing"]
  assert [s["labels"] for s in decision["steps"]] == [[1, 2], [1], [2]]
  for case in os.listdir(os.path.join(folder, "crossval", "predictions")):
    raw = np.asarray(nib.load(os.path.join(folder, "crossval", "predictions", case)).dataobj)
    post = np.asarray(nib.load(os.path.join(folder, "crossval", "postprocessed", case)).dataobj)
    np.testing.assert_array_equal(post, pp.apply_postprocessing(raw, decision))


def test_the_hold_out_compares_fold0_with_the_ensemble(evaluated):
  folder, _, _, held = evaluated
  assert held["cases"] == 1
  for variant in ("fold0", "fold0+pp", "ensemble", "ensemble+pp"):
    assert 0.0 <= held[variant]["foreground_dice"] <= 1.0
  diff = held["ensemble_minus_fold0"]["raw"]["value"]
  assert diff == pytest.approx(held["ensemble"]["foreground_dice"] -
                               held["fold0"]["foreground_dice"])
  text = open(os.path.join(folder, "crossval", "holdout", "results.md")).read()
  assert "ensemble+pp" in text and "Ensemble minus the mean single fold" in text
  assert len(held["single_folds"]) == 2
  assert held["single_folds"][0] == pytest.approx(held["fold0"]["foreground_dice"])
  assert 0.0 <= held["fold_agreement"] <= 1.0 and "The folds agree with one another" in text
  assert held["ensemble_minus_mean_fold"]["value"] == pytest.approx(
      held["ensemble"]["foreground_dice"] - np.mean(held["single_folds"]))
  # Two folds: the ensemble sizes are each fold alone (their mean) and both together.
  assert held["ensemble_sizes"]["curve"] == pytest.approx(
      {1: np.mean(held["single_folds"]), 2: held["ensemble"]["foreground_dice"]})
  assert held["ensemble_sizes"]["projected"] is None and "Ensembles of k folds" in text


def _class1_everywhere(run: str, case: str) -> dict:
  """The hold-out metrics of a prediction of class 1 over the whole preprocessed grid, put back
  on the case's own grid."""
  plan = json.load(open(os.path.join(run, "plan.json")))
  image, label = msd.load_msd_case(crossval.dataset_of(run), crossval.dataset_of(run).case(case))
  array, _, props = preprocess(image, None, plan)
  probs = np.eye(3)[np.ones(array.shape[:-1], int)]
  pred = planning.label_map(restore_geometry(probs, props), plan)
  return seg_metrics.segmentation_metrics(pred, label.array, label.spacing, [1, 2])


class _SaysClass1(crossval.Ensemble):
  """Members from ``first`` on put probability 1 on class 1 everywhere."""
  first = 2

  def __init__(self, runs, *args, **kwargs):
    super().__init__(runs, *args, **kwargs)
    for member in self.members[self.first:]:
      member.probabilities = lambda array, mirror, m=self.members[0]: np.eye(3)[
          np.ones(m.probabilities(array, mirror).shape[:-1], int)]


def test_the_hold_out_scores_every_fold_alone(evaluated, tmp_path, monkeypatch):
  folder, _, _, held = evaluated
  here = str(tmp_path / "here")
  shutil.copytree(folder, here)
  monkeypatch.setattr(_SaysClass1, "first", 1)
  monkeypatch.setattr(crossval, "Ensemble", _SaysClass1)
  result = crossval.evaluate_holdout(here, n_boot=20, mirror=False)
  want = seg_metrics.summarize([_class1_everywhere(os.path.join(here, "fold1"), "case_006")])
  assert result["single_folds"] == pytest.approx([held["fold0"]["foreground_dice"],
                                                  want.foreground_dice])
  assert result["fold0"]["foreground_dice"] == pytest.approx(held["fold0"]["foreground_dice"])
  # How alike the two folds predict: fold 0's own label map against fold 1's class 1.
  run = os.path.join(here, "fold0")
  plan = json.load(open(os.path.join(run, "plan.json")))
  image, _ = msd.load_msd_case(crossval.dataset_of(run), crossval.dataset_of(run).case("case_006"))
  array, _, props = preprocess(image, None, plan)
  fold0, fold1 = (planning.label_map(restore_geometry(p, props), plan) for p in (
      ensemble_lib.Segmenter(run).probabilities(array, False),
      np.eye(3)[np.ones(array.shape[:-1], int)]))  # class 1 over the preprocessed grid
  assert result["fold_agreement"] == pytest.approx(crossval.fold_agreement([fold0, fold1],
                                                                           [1, 2]))
  assert result["fold_agreement"] != pytest.approx(held["fold_agreement"])


def test_fold_agreement_is_the_mean_pairwise_dice():
  a, b, c = np.array([1, 1, 2, 0]), np.array([1, 0, 2, 2]), np.array([0, 0, 0, 0])
  # a~b: class 1 2/3, class 2 2/3; a~c and b~c: 0 for each class a or b has.
  assert crossval.fold_agreement([a, b], [1, 2]) == pytest.approx(2 / 3)
  assert crossval.fold_agreement([a, b, c], [1, 2]) == pytest.approx((2 / 3 * 2) / 6)
  assert crossval.fold_agreement([a, a], [1, 2, 3]) == 1.0  # class 3 in neither: left out
  assert np.isnan(crossval.fold_agreement([c, c], [1]))


def _rows(*dice_per_case: float) -> list[dict]:
  """Per-case rows whose classes 1 and 2 both score ``dice``."""
  return [{"case": f"c{i}", "metrics": {c: dict.fromkeys(seg_metrics.METRICS, d) for c in (1, 2)}}
          for i, d in enumerate(dice_per_case)]


def test_ensemble_sizes_average_every_choice_of_k_members_and_project_the_limit():
  # Three members: sizes 1, 2 and 3 scored as a - b/k with a = 0.9, b = 0.06, spread over
  # the choices of k and over cases so that only the averages follow the law.
  scored = {(0,): _rows(0.81, 0.83), (1,): _rows(0.85, 0.85), (2,): _rows(0.84, 0.86),
            (0, 1): _rows(0.85, 0.87), (0, 2): _rows(0.87, 0.87), (1, 2): _rows(0.89, 0.87),
            (0, 1, 2): _rows(0.88, 0.88)}
  sizes = crossval.ensemble_sizes(scored)
  assert sizes["curve"] == pytest.approx({1: 0.84, 2: 0.87, 3: 0.88})
  assert sizes["projected"]["dice"] == pytest.approx(0.9)
  assert sizes["projected"]["b"] == pytest.approx(0.06)
  # Two sizes: a curve, no projection.
  assert crossval.ensemble_sizes({(0,): _rows(0.8), (0, 1): _rows(0.9)})["projected"] is None


def test_the_hold_out_can_add_another_cv_folders_folds(evaluated, tmp_path, monkeypatch):
  folder, _, _, held = evaluated
  here, other = str(tmp_path / "here"), str(tmp_path / "other")  # copies: the hold-out writes
  shutil.copytree(folder, here)
  shutil.copytree(folder, other)

  monkeypatch.setattr(crossval, "Ensemble", _SaysClass1)  # the other folder's two say class 1
  both = crossval.evaluate_holdout(here, n_boot=20, mirror=False, also=[other])
  # The mean of all four has class 1 above one half, whatever this folder's two folds say.
  want = _class1_everywhere(os.path.join(here, "fold0"), "case_006")
  assert both["combined"]["foreground_dice"] == pytest.approx(
      seg_metrics.summarize([want]).foreground_dice)
  assert both["combined"]["per_class"]["core"]["dice"] == 0.0
  assert both["single_folds"] == pytest.approx(held["single_folds"])
  # The fold ensemble is still this folder's two folds alone.
  assert both["ensemble"]["foreground_dice"] == pytest.approx(held["ensemble"]["foreground_dice"])
  text = open(os.path.join(here, "crossval", "holdout", "results.md")).read()
  assert "combined: the 2 folds here and the 2 of" in text and "| combined+pp |" in text
  # Folds that may have trained on the held-out case are refused, naming their config.
  clear_holdout(other)
  with pytest.raises(MedjaxIOError, match=r"lacks 1 of .*\(e\.g\. case_006\)"):
    crossval.evaluate_holdout(here, n_boot=20, mirror=False, also=[other])


def test_predict_with_a_cv_folder_ensembles_the_folds_and_applies_its_decision(evaluated,
                                                                                tmp_path):
  folder, msd_root, _, _ = evaluated
  image = os.path.join(msd_root, "imagesTr", "case_006.nii.gz")
  # A decision that keeps one component of class 2, so that its effect shows.
  decision = {"keep_largest": [[2]]}
  pp.write_decision(os.path.join(folder, pp.FILENAME), decision)
  outs = {}
  for name, flag in (("auto", "auto"), ("none", "none")):
    code, _, err = run_cli(predict, f"--workdir={folder}", f"--input={image}",
                           f"--output={tmp_path / name}", "--no_mirror", "--probabilities",
                           f"--postprocessing={flag}")
    assert code == predict.EXIT_OK, err
    outs[name] = np.asarray(nib.load(str(tmp_path / name / "case_006_seg.nii.gz")).dataobj)
  record = json.load(open(tmp_path / "auto" / "predict.json"))
  assert len(record["workdir"]) == 2 and len(record["step"]) == 2
  assert record["settings"]["postprocessing"] == decision
  probs = np.asarray(nib.load(str(tmp_path / "none" / "case_006_probs.nii.gz")).dataobj)
  np.testing.assert_array_equal(outs["none"], np.argmax(probs, -1))

  def components(labels):
    return ndimage.label(labels == 2, np.ones((3, 3, 3)))[1]

  assert components(outs["none"]) > 1  # the plain argmax has components to remove
  np.testing.assert_array_equal(outs["auto"], pp.apply_postprocessing(outs["none"], decision))
  assert components(outs["auto"]) < components(outs["none"])
  # The ensemble's probabilities are the folds' mean (the CLI and the API agree).
  model = ensemble_lib.load_segmenter(folder, postprocessing="none")
  assert model.postprocessing is None and len(model.members) == 2


def test_command_line(cv_runs, tmp_path):
  folder = str(tmp_path / "cv")
  shutil.copytree(cv_runs[0], folder)
  out = subprocess.run([sys.executable, "-m", "medjax.evaluate", "--cv", folder, "--n_boot",
                        "20", "--holdout", "--no_mirror"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "cross-validation: 6 cases out of fold" in out.stdout
  held = json.load(open(os.path.join(folder, "crossval", "holdout", "summary.json")))
  assert (f"hold-out (1 cases) mean Dice: fold0 {held['fold0']['foreground_dice']:.4f}, "
          in out.stdout and f"each fold alone {min(held['single_folds']):.4f}–" in out.stdout)
  assert os.path.isfile(os.path.join(folder, "postprocessing.json"))
  out = subprocess.run([sys.executable, "-m", "medjax.evaluate", "--cv", folder,
                        f"--holdout_also={folder}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      "error: --holdout_also adds to the hold-out comparison: give --holdout too"]
  shutil.rmtree(os.path.join(folder, "fold1"))
  out = subprocess.run([sys.executable, "-m", "medjax.evaluate", "--cv", folder], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      f"error: {folder}: fold(s) 1 of 2 missing (found 0)"]
