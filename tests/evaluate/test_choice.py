"""Choosing between configurations and their ensembles on out-of-fold predictions."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from helpers import clear_holdout

from medjax import planning
from medjax.evaluate import choice, crossval
from medjax.infer import ensemble as ensemble_lib
from medjax.infer.segment import Segmenter
from medjax.io import msd
from medjax.io.errors import MedjaxIOError
from medjax.metrics import postprocessing as pp
from medjax.metrics import segmentation as seg_metrics
from medjax.planning.preprocessing import preprocess, restore_geometry


@pytest.fixture
def two_configs(cv_runs, tmp_path):
  """Two copies of the cross-validation folder, ``a`` and ``b``: the same folds and splits."""
  folders = [str(tmp_path / name) for name in ("a", "b")]
  for folder in folders:
    shutil.copytree(cv_runs[0], folder)
  return folders


def _soft_truth(label: np.ndarray) -> np.ndarray:
  """Probabilities ``[*spatial, 3]`` whose argmax is ``label`` by a thin margin (0.34 against
  0.33), so that another member's probabilities can outvote it in a mean."""
  return np.full(label.shape[:-1] + (3,), 0.33) + 0.01 * np.eye(3)[label[..., 0]]


def _truth_says(monkeypatch, folder: str, run: str) -> None:
  """Makes ``folder``'s folds predict each case's reference label (`_soft_truth`) on the
  preprocessed grid; every other run predicts as it was trained."""
  plan = json.load(open(os.path.join(run, "plan.json")))
  dataset = crossval.dataset_of(run)
  truths = []
  for case in dataset.cases:
    array, label, _ = preprocess(*msd.load_msd_case(dataset, case), plan)
    truths.append((array, _soft_truth(label)))
  real = Segmenter.probabilities

  def probabilities(self, array, mirror=True, overlap=0.5):
    if not self.workdir.startswith(folder + os.sep):
      return real(self, array, mirror, overlap)
    return next(t for a, t in truths if a.shape == array.shape and np.array_equal(a, array))

  monkeypatch.setattr(Segmenter, "probabilities", probabilities)


def test_a_config_alone_scores_as_its_cross_validation(two_configs, tmp_path):
  a, b = two_configs
  out = str(tmp_path / "choice")
  result = choice.choose_configuration([a, b], out, n_boot=20, mirror=False)
  names = [c["name"] for c in result["candidates"]]
  assert names == ["a", "b", "a+b"] and result["cases"] == 6 and result["skipped"] == []
  # Each fold re-predicts its own validation cases as its validation did: the same Dice.
  cv = crossval.evaluate_cv(a, n_boot=20)
  dice = [c["foreground_dice"] for c in result["candidates"]]
  assert dice == pytest.approx([cv["raw"]["foreground_dice"]] * 3)
  # Equal scores: the first (a configuration alone, cheaper than an ensemble) is chosen.
  assert result["chosen"] == "a"
  assert json.load(open(os.path.join(out, "choice.json")))["configurations"] == [
      os.path.relpath(a, out)]
  assert result["candidates"][1]["best_minus_this"]["value"] == pytest.approx(0.0)


def test_the_best_candidate_is_chosen_and_ensembles_average_probabilities(
    two_configs, tmp_path, monkeypatch):
  a, b = two_configs
  run = os.path.join(a, "fold0")
  _truth_says(monkeypatch, b, run)
  out = str(tmp_path / "choice")
  result = choice.choose_configuration([a, b], out, n_boot=20, mirror=False)
  by_name = {c["name"]: c for c in result["candidates"]}
  assert result["chosen"] == "b" and by_name["b"]["foreground_dice"] > 0.9
  assert by_name["b"]["foreground_dice"] > by_name["a"]["foreground_dice"]
  assert by_name["a"]["best_minus_this"]["value"] == pytest.approx(
      by_name["b"]["foreground_dice"] - by_name["a"]["foreground_dice"])
  # a+b on one case by hand: the mean of fold 1's real probabilities and the soft truth.
  plan = json.load(open(os.path.join(run, "plan.json")))
  dataset = crossval.dataset_of(run)
  splits = json.load(open(os.path.join(a, "fold1", "splits.json")))
  case = splits[1]["val"][0]
  image, label = msd.load_msd_case(dataset, dataset.case(case))
  array, truth, props = preprocess(image, label, plan)
  real = Segmenter(os.path.join(a, "fold1")).probabilities(array, False)
  mean = (real + _soft_truth(truth)) / 2
  want = seg_metrics.segmentation_metrics(
      planning.label_map(restore_geometry(mean, props), plan), label.array, label.spacing, [1, 2])
  rows = [r.split(",") for r in open(os.path.join(out, "results.csv")).read().splitlines()]
  got = {name: {r[3]: float(r[4]) for r in rows[1:] if r[0] == case and r[2] == name}
         for name in ("a", "b", "a+b")}
  assert got["a+b"] == pytest.approx({"outer": want[1]["dice"], "core": want[2]["dice"]},
                                     nan_ok=True)
  assert got["a+b"] != pytest.approx(got["a"]) and got["a+b"] != pytest.approx(got["b"])
  # The chosen configuration's folds and decision are what predict loads from the choice folder.
  runs, decision = ensemble_lib.resolve_runs(out)
  assert runs == ensemble_lib.fold_runs(b) and decision == os.path.join(out, pp.FILENAME)
  assert pp.read_decision(decision)["configurations"] == [os.path.relpath(b, out)]
  model = ensemble_lib.load_segmenter(out)
  assert model.workdirs == runs and model.postprocessing == pp.read_decision(decision)
  text = open(os.path.join(out, "results.md")).read()
  assert "**Chosen: b.**" in text and "| a+b |" in text


def test_the_choice_is_tested_on_the_hold_out(two_configs, tmp_path, monkeypatch):
  a, b = two_configs
  run = os.path.join(a, "fold0")
  _truth_says(monkeypatch, b, run)
  out = str(tmp_path / "choice")
  result = choice.choose_configuration([a, b], out, n_boot=20, mirror=False, holdout=True)
  held = result["holdout"]
  assert result["chosen"] == "b" and held["cases"] == 1 and held["reference"] == "a fold 0"
  variants = held["variants"]
  assert list(variants) == ["a fold 0", "a", "b", "a+b", "b, post-processed"]
  # By hand on case_006: a's fold 0 alone, and a+b as the mean of all four folds' probabilities.
  plan = json.load(open(os.path.join(run, "plan.json")))
  dataset = crossval.dataset_of(run)
  image, label = msd.load_msd_case(dataset, dataset.case("case_006"))
  array, truth, props = preprocess(image, label, plan)
  real = [Segmenter(os.path.join(a, f"fold{k}")).probabilities(array, False) for k in range(2)]
  soft = _soft_truth(truth)

  def dice(probs):
    seg = planning.label_map(restore_geometry(probs, props), plan)
    return seg_metrics.summarize([seg_metrics.segmentation_metrics(
        seg, label.array, label.spacing, [1, 2])]).foreground_dice

  assert variants["a fold 0"]["foreground_dice"] == pytest.approx(dice(real[0]))
  assert variants["a"]["foreground_dice"] == pytest.approx(dice(np.mean(real, 0)))
  assert variants["b"]["foreground_dice"] == pytest.approx(dice(soft)) and dice(soft) > 0.9
  assert variants["a+b"]["foreground_dice"] == pytest.approx(
      dice(np.mean(real + [soft, soft], 0)))
  assert variants["b"]["minus_reference"]["value"] == pytest.approx(
      dice(soft) - dice(real[0]))
  assert variants["a fold 0"]["minus_reference"] is None
  text = open(os.path.join(out, "holdout", "results.md")).read()
  assert "Chosen out of fold: **b**" in text and "| b, post-processed |" in text
  ci = variants["a fold 0"]["dice_ci95"]["outer"]
  assert f"| a fold 0 | {ci['value']:.4f} [{ci['lo']:.3f}, {ci['hi']:.3f}] |" in text
  assert json.load(open(os.path.join(out, "summary.json")))["holdout"]["cases"] == 1
  # A folder whose folds may have trained on a held-out case is refused before any prediction.
  clear_holdout(b)
  with pytest.raises(MedjaxIOError, match=r"b/fold0/config\.json: data\.holdout lacks 1 of"):
    choice.choose_configuration([a, b], str(tmp_path / "other"), n_boot=20, holdout=True)
  assert not os.path.exists(tmp_path / "other")


def test_folds_split_otherwise_are_refused(two_configs, tmp_path):
  a, b = two_configs
  for fold in ("fold0", "fold1"):
    path = os.path.join(b, fold, "splits.json")
    splits = json.load(open(path))
    splits[0]["val"], splits[1]["val"] = splits[1]["val"], splits[0]["val"]
    json.dump(splits, open(path, "w"))
  with pytest.raises(MedjaxIOError, match=r"b/fold0/splits\.json: its folds differ from a's"):
    choice.choose_configuration([a, b], str(tmp_path / "choice"), n_boot=20, mirror=False)


def test_a_damaged_choice_folder_is_refused_naming_its_file(two_configs, tmp_path):
  out = tmp_path / "choice"
  out.mkdir()
  path = out / "choice.json"
  for text, problem in (("{", "not a choice written by medjax.evaluate --choose"),
                        ('{"configurations": []}', "'configurations' must be a list")):
    path.write_text(text)
    with pytest.raises(MedjaxIOError, match=f"{path}: {problem}"):
      ensemble_lib.load_segmenter(str(out))
  path.write_text(json.dumps({"configurations": [os.path.relpath(two_configs[0], out)]}))
  with pytest.raises(MedjaxIOError, match=r"postprocessing\.json: missing: .* --choose"):
    ensemble_lib.load_segmenter(str(out))


def test_a_folder_named_twice_is_refused(two_configs):
  with pytest.raises(ValueError, match="names a folder twice"):
    choice.choose_configuration([two_configs[0], two_configs[0] + "/"], n_boot=20)


def test_ensembles_of_configs_that_preprocess_otherwise_are_left_out():
  plans = [{"target_spacing": [1, 1, 1]}, {"target_spacing": [1, 1, 1]},
           {"target_spacing": [2, 2, 2]}]
  kept, skipped = choice.candidates(plans, ["x", "y", "z"])
  assert kept == [(0,), (1,), (2,), (0, 1)]
  assert skipped[0] == "x+z (target_spacing: [1, 1, 1] vs [2, 2, 2])" and len(skipped) == 3


def test_command_line(two_configs, tmp_path):
  a, b = two_configs
  out = str(tmp_path / "choice")
  cmd = [sys.executable, "-m", "medjax.evaluate", "--n_boot", "20", "--no_mirror"]
  run = subprocess.run(cmd + [f"--choose={a},{b}", f"--out={out}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert (f"6 cases out of fold, mean foreground Dice: a {summary['candidates'][0]['foreground_dice']:.4f}"
          in run.stdout and f"chosen: a, written to {out}" in run.stdout)
  run = subprocess.run(cmd + [f"--choose={a},{b}", f"--out={out}", "--holdout"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  held = json.load(open(os.path.join(out, "holdout", "summary.json")))
  assert ("hold-out (1 cases) mean Dice: a fold 0 "
          f"{held['variants']['a fold 0']['foreground_dice']:.4f}, a ") in run.stdout
  run = subprocess.run(cmd + [f"--choose={a},{b}", "--holdout", f"--holdout_also={a}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2 and run.stderr.strip().splitlines() == [
      "error: --holdout_also is for --cv; --choose --holdout scores every folder it names"]
  run = subprocess.run(cmd + [f"--choose={a}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2 and run.stderr.strip().splitlines() == [
      "error: --choose compares configurations: give two or more cross-validation folders "
      "(got 1)"]
