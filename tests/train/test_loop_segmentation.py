"""The training loop on segmentation: a synthetic MSD folder, 3-D and 2-D plans, resume, DP."""

import json
import os
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import write_msd
from helpers import apply_overrides, final_params, rel_diff

from configs import hippocampus_unet2d, hippocampus_unet3d
from medjax.infer import segment
from medjax.train import loop


def _config(data_dir, dims=3, steps=6, variants="", **overrides):
  module = hippocampus_unet3d if dims == 3 else hippocampus_unet2d
  c = module.get_config("runlocal" + (f",{variants}" if variants else ""))
  c.data.dir = data_dir
  c.train.steps = steps
  c.eval.every_steps = 3
  c.mesh.data = 1  # one device unless a test says otherwise (helpers.config says why)
  return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
  return write_msd(tmp_path_factory.mktemp("msd"), n=10, lps=True)


@pytest.mark.parametrize("dims,variants,slice_axis", [(3, "", None), (2, "", 0), (2, "axial", 2)])
def test_trains_validates_and_writes_in_the_input_geometry(msd_root, tmp_path, dims, variants,
                                                           slice_axis):
  workdir = str(tmp_path / "run")
  summary = loop.train_and_evaluate(_config(msd_root, dims=dims, variants=variants), workdir)
  for name in ("plan.json", "splits.json", "results.md", "plots/curves.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  plan = json.load(open(os.path.join(workdir, "plan.json")))
  assert plan["dims"] == dims and plan.get("slice_axis") == slice_axis
  assert 0.0 <= summary["best"]["dice"] <= 1.0 and "dice_2" in summary["best"]
  result = segment.validate(workdir, mirror=True, overlays=1)
  val = json.load(open(os.path.join(workdir, "splits.json")))[0]["val"]
  assert result["cases"] == len(val) == 2
  for case_id in val:
    written = nib.load(os.path.join(workdir, "validation", f"{case_id}.nii.gz"))
    source = nib.load(os.path.join(msd_root, "imagesTr", f"{case_id}.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
  assert "HD95 (mm)" in open(os.path.join(workdir, "results.md")).read()
  rows = open(os.path.join(workdir, "validation", "results.csv")).read().splitlines()
  assert rows[0] == "case,class,dice,iou,hd95,msd" and len(rows) == 1 + 2 * 2
  assert os.path.getsize(os.path.join(workdir, "validation", "dice_boxes.png")) > 0
  assert set(result["dice_ci95"]) == {"outer", "core", "foreground"}


def test_learns_the_synthetic_structures(msd_root, tmp_path):
  c = _config(msd_root, steps=150, **{"optim.lr": 1e-2, "eval.every_steps": 150})
  summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["best"]["dice"] > 0.7, summary


def test_resume_equals_uninterrupted_and_data_parallel_matches(msd_root, tmp_path):
  assert jax.device_count() == 4
  keep = {"mesh.data": 4, "train.keep_checkpoints": 3}
  straight = str(tmp_path / "straight")
  loop.train_and_evaluate(_config(msd_root, steps=6, **keep), straight)
  # Rewind a copy to the step-3 checkpoint (train state and data iterator), then resume it to
  # step 6.
  split = str(tmp_path / "split")
  shutil.copytree(straight, split)
  os.remove(os.path.join(split, "summary.json"))
  ckpts = os.path.join(split, "checkpoints")
  assert "3" in os.listdir(ckpts)
  for step in os.listdir(ckpts):
    if step.isdigit() and int(step) > 3:
      shutil.rmtree(os.path.join(ckpts, step))
  loop.train_and_evaluate(_config(msd_root, steps=6, **keep), split)
  assert rel_diff(final_params(split, 6)["params"], final_params(straight, 6)["params"]) < 1e-6
  one = str(tmp_path / "one")
  loop.train_and_evaluate(_config(msd_root, steps=6, **{**keep, "mesh.data": 1}), one)
  assert rel_diff(final_params(one, 6)["params"], final_params(straight, 6)["params"]) < 1e-4


def test_another_experiments_workdir_is_refused_before_anything_is_written(msd_root, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  other = _config(msd_root, **{"optim.lr": 0.5})
  loop.check_workdir_config(str(workdir), other)  # as a run of another config leaves it
  with pytest.raises(loop.ConfigMismatchError, match="optim.lr"):
    loop.train_and_evaluate(_config(msd_root), str(workdir))
  assert sorted(os.listdir(workdir)) == ["config.json"]  # no plan, splits or cache beside it
