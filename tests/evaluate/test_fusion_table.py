"""``python -m medjax.evaluate.fusion``: the fusion results table on the whole-case test split."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import write_fusion_atlas
from helpers import run_cli

from medjax.data import fusion
from medjax.evaluate import fusion as evaluate_fusion
from medjax.io import harvard
from medjax.metrics.fusion import METRICS, score


def _run(*args):
  return run_cli(evaluate_fusion, *args)


def test_the_table_scores_each_method_on_the_test_cases_only(tmp_path):
  root = write_fusion_atlas(str(tmp_path / "atlas"))
  out, figures = str(tmp_path / "out"), str(tmp_path / "figures")
  code, stdout, _ = _run(f"--data_dir={root}", f"--out={out}", "--methods=max,pyramid",
                         f"--figure_dir={figures}", "--figure_rows=1")
  assert code == 0
  split = harvard.split_of(root)
  summary = json.load(open(os.path.join(out, "fusion_table.json")))
  assert [s["pair"] for s in summary] == list(harvard.PAIRS)
  for s in summary:
    assert s["cases"] == split[s["pair"]] and list(s["mean"]) == ["max", "pyramid"]
  rows = list(csv.DictReader(open(os.path.join(out, "fusion_scores.csv"))))
  tests = harvard.read_pairs(root, "PET-MRI", "test")
  pet = [r for r in rows if r["pair"] == "PET-MRI" and r["method"] == "pyramid"]
  assert [r["id"] for r in pet] == [p.id for p in tests]
  expected = score(fusion.to_uint8(fusion.fuse(tests[0].a, tests[0].b, "pyramid")),
                   tests[0].a, tests[0].b)
  assert [float(pet[0][k]) for k in METRICS] == pytest.approx(list(expected.values()), abs=1e-5)
  mean = np.mean([float(r["Qabf"]) for r in pet])
  assert summary[1]["mean"]["pyramid"]["Qabf"] == pytest.approx(mean, abs=1e-5)
  table = open(os.path.join(out, "fusion_table.md")).read()
  assert stdout == table and "| PET-MRI | pyramid |" in table and "SSIM |" in table
  assert sorted(os.listdir(figures)) == [f"fusion_{p}.png" for p in harvard.PAIRS]


def test_copying_a_source_is_scored_as_a_reference(tmp_path):
  root = write_fusion_atlas(str(tmp_path / "atlas"), cases={"CT-MRI": {2: 1, 3: 1}})
  results = evaluate_fusion.evaluate(root, str(tmp_path / "out"), ["CT-MRI"], ["copy_a"])
  copy = results[0]["mean"]["copy_a"]
  assert np.isnan(copy["SCD"])  # F - A = 0: SCD is undefined for an exact copy
  assert copy["VIF"] >= 1.0  # VIF(A -> A) = 1, plus whatever of B the copy of A carries


def test_a_missing_pair_folder_is_one_error_line(tmp_path):
  root = write_fusion_atlas(str(tmp_path / "atlas"), cases={"CT-MRI": {2: 1, 3: 1}})
  code, _, stderr = _run(f"--data_dir={root}", f"--out={tmp_path}/out", "--pairs=CT-MRI,PET-MRI")
  assert code == 2 and stderr.startswith("error: ") and "PET-MRI/MRI: missing folder" in stderr
  assert len(stderr.strip().splitlines()) == 1
