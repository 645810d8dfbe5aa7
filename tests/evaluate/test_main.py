"""``python -m medjax.evaluate`` on a finished classification run."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, write_multilabel_medmnist, write_synthetic_medmnist

from medjax.evaluate.__main__ import evaluate_classification
from medjax.train import loop


@pytest.fixture(scope="module")
def run(learned_run, tmp_path_factory):
  """A copy of the shared learnt run (evaluation writes into the workdir)."""
  workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
  shutil.copytree(learned_run[0], workdir)
  return workdir, learned_run[1]


def test_report_agrees_with_the_loop_and_writes_every_artefact(run):
  workdir, summary = run
  report = evaluate_classification(workdir, "val", n_boot=50)
  auc = report["metrics"]["auc"]
  assert auc["value"] == pytest.approx(summary["best"]["auc"], abs=1e-6)
  assert auc["lo"] <= auc["value"] <= auc["hi"]
  out = os.path.join(workdir, "evaluation", "val")
  for name in ("results.md", "results.csv", "report.json", "predictions.csv", "plots/roc.png",
               "plots/pr.png", "plots/reliability.png", "plots/confusion.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 40 and set(rows[0]) == {"index", "label", "p_normal", "p_pneumonia"}
  assert json.load(open(os.path.join(out, "report.json")))["step"] == summary["best_step"]


def test_test_split_and_temperature_scaling(run):
  workdir, _ = run
  report = evaluate_classification(workdir, "test", n_boot=20, temperature=True)
  assert report["split"] == "test" and report["temperature"] > 0
  assert os.path.exists(os.path.join(workdir, "evaluation", "test", "results.md"))


def test_command_line(run):
  workdir, _ = run
  out = subprocess.run([sys.executable, "-m", "medjax.evaluate", "--workdir", workdir,
                        "--split", "val", "--n_boot", "20"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| AUC |" in out.stdout


def test_sequence_model_saves_and_plots_its_slice_attention(tmp_path):
  import numpy as np

  from configs import adrenalmnist3d_lstm

  data = write_synthetic_medmnist(str(tmp_path), flag="adrenalmnist3d", n_train=16, n_val=12,
                                  ndim=3)
  c = adrenalmnist3d_lstm.get_config("runlocal")
  c.data.dir, c.train.steps, c.mesh.data = data, 2, 1
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(c, workdir)
  evaluate_classification(workdir, "val", n_boot=10)
  out = os.path.join(workdir, "evaluation", "val")
  weights = np.load(os.path.join(out, "slice_attention.npy"))
  assert weights.shape == (12, 28)
  np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
  assert os.path.getsize(os.path.join(out, "plots", "slice_attention.png")) > 0
  assert "slice_attention.png" in open(os.path.join(out, "results.md")).read()


def test_multilabel_run_is_scored_label_by_label(tmp_path):
  import numpy as np
  from helpers import config as make_config

  folder = write_multilabel_medmnist(str(tmp_path))
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(make_config(folder, steps=2, **{"data.name": "chestmnist"}),
                          workdir)
  report = evaluate_classification(workdir, "val", n_boot=10)
  assert report["multi_label"] and len(report["class_names"]) == 14
  name = report["class_names"][0]
  assert {"macro_auc", f"auc[{name}]", f"sensitivity[{name}]"} <= set(report["metrics"])
  from sklearn.metrics import roc_auc_score

  rows = list(csv.DictReader(open(os.path.join(workdir, "evaluation", "val",
                                               "predictions.csv"))))
  y = np.array([int(r[f"label_{name}"]) for r in rows])
  p = np.array([float(r[f"p_{name}"]) for r in rows])
  assert report["metrics"][f"auc[{name}]"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
  assert "Macro AUC" in open(os.path.join(workdir, "evaluation", "val", "results.md")).read()
