"""Feature export: embeddings that a classical model downstream can use."""

import csv
import json
import os

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medjax.infer.features import export_features


@pytest.fixture(scope="module")
def run(learned_run):
  """The shared run that has learnt the synthetic task (val AUC near 1)."""
  return learned_run


def test_logistic_regression_on_exported_features_matches_the_models_auc(run, tmp_path):
  workdir, summary = run
  meta = export_features(workdir, ["train", "val"], str(tmp_path), progress=False)
  train, val = np.load(tmp_path / "train.npy"), np.load(tmp_path / "val.npy")
  assert train.shape == (256, meta["splits"]["train"]["dim"]) and val.shape[0] == 40
  labels = {}
  for split in ("train", "val"):
    with open(tmp_path / f"{split}.csv") as f:
      rows = list(csv.DictReader(f))
    labels[split] = np.array([int(r["label"]) for r in rows])
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    np.testing.assert_allclose([float(rows[3]["f0"]), float(rows[3]["f1"])],
                               np.load(tmp_path / f"{split}.npy")[3, :2], rtol=1e-6)
  clf = LogisticRegression(max_iter=2000).fit(train, labels["train"])
  auc = roc_auc_score(labels["val"], clf.predict_proba(val)[:, 1])
  assert summary["best"]["auc"] > 0.9, summary  # the check below is only meaningful then
  assert abs(auc - summary["best"]["auc"]) <= 0.03, (auc, summary["best"]["auc"])
  assert json.load(open(tmp_path / "features.json"))["step"] == summary["best_step"]


def test_command_line_writes_each_split(run, tmp_path):
  import subprocess
  import sys

  from conftest import REPO

  out = subprocess.run([sys.executable, "-m", "medjax.infer.features", "--workdir", run[0],
                        "--split", "val", "--out", str(tmp_path / "f")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert os.path.exists(tmp_path / "f" / "val.csv") and "val: 40 ×" in out.stdout
