"""The hold-out cases a config keeps out of the plan and every fold (``data.holdout``)."""

import os

import pytest
from conftest import write_msd

from configs import hippocampus_unet2d, hippocampus_unet3d
from medjax.io import msd
from medjax.planning import hash_holdout, without_holdout


def test_the_hippocampus_holdout_is_the_documented_hash_rule(data_root):
  dataset = msd.read_msd_dataset(os.path.join(data_root, "msd_task04_hippocampus"))
  ids = [c.case_id for c in dataset.cases]
  assert len(ids) == 208
  assert hippocampus_unet3d.HOLDOUT == tuple(hash_holdout(ids, 20))
  assert hippocampus_unet3d.get_config("cv").data.holdout == hippocampus_unet3d.HOLDOUT
  assert hippocampus_unet3d.get_config().data.holdout == ()  # the single-fold recipe keeps all
  # The 2-D folds hold out the same cases, so that 2-D and 3-D runs can be ensembled on them.
  assert hippocampus_unet2d.get_config("cv").data.holdout == hippocampus_unet3d.HOLDOUT
  # One member per fold, each with its own seed; fold 0 trains as the single-fold recipe does.
  assert hippocampus_unet3d.get_sweep("cv") == [{"data.fold": k, "seed": k} for k in range(5)]
  assert hippocampus_unet3d.get_config().seed == 0


def test_the_rule_depends_on_the_ids_alone():
  ids = [f"case_{k:03d}" for k in range(30)]
  chosen = hash_holdout(ids, 5)
  assert chosen == hash_holdout(ids[::-1], 5) == sorted(chosen) and len(set(chosen)) == 5
  assert set(hash_holdout(ids, 6)) > set(chosen)
  with pytest.raises(ValueError, match="cannot hold out 31 of 30"):
    hash_holdout(ids, 31)


def test_held_out_cases_leave_the_dataset_and_unknown_ones_are_named(tmp_path):
  dataset = msd.read_msd_dataset(write_msd(tmp_path, n=4))
  kept = without_holdout(dataset, ("case_001",))
  assert [c.case_id for c in kept.cases] == ["case_000", "case_002", "case_003"]
  assert without_holdout(dataset, ()) is dataset
  with pytest.raises(ValueError, match="data.holdout: case_009 not among the cases of"):
    without_holdout(dataset, ("case_001", "case_009"))
