"""Multi-modal segmentation through the loop: late fusion with modality dropout on a synthetic
two-channel MSD folder, then prediction with a channel missing (refused, or zero-filled)."""

import contextlib
import io
import json
import os

import nibabel as nib
import numpy as np
import pytest
from absl import flags
from conftest import write_msd
from helpers import final_params, seg_config

from configs import brats_fusion_unet
from medjax.infer import predict
from medjax.infer.segment import Segmenter
from medjax.io.errors import is_users_error
from medjax.io.volume import Volume
from medjax.train import loop

CHANNELS = ("FLAIR", "T1")


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
  root = write_msd(tmp_path_factory.mktemp("msd2"), n=4, channels=CHANNELS, layout="nnunet",
                   shape=(12, 14, 10))
  c = seg_config(root, steps=2, **{"model.kwargs.fusion": "late", "train.modality_dropout": 0.5,
                                   "data.folds": 2, "train.batch_size": 2, "eval.batch_size": 2})
  workdir = str(tmp_path_factory.mktemp("run") / "late")
  summary = loop.train_and_evaluate(c, workdir)
  return {"root": root, "workdir": workdir, "summary": summary}


def test_late_fusion_trains_with_one_encoder_per_modality(fused_run):
  assert 0.0 <= fused_run["summary"]["best"]["dice"] <= 1.0
  params = final_params(fused_run["workdir"])["params"]
  assert {"modality0", "modality1", "fuse0"} <= set(params) and "enc0_0" not in params
  plan = json.load(open(os.path.join(fused_run["workdir"], "plan.json")))
  assert plan["channels"] == list(CHANNELS)


def _predict(workdir, folder, out, *extra):
  fv = flags.FlagValues()
  predict.define_flags(fv)
  fv(["predict", f"--workdir={workdir}", f"--input={folder}", f"--output={out}", "--no_mirror",
      *extra])
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    code = predict.main([], fv)
  return code, stderr.getvalue()


def test_a_missing_modality_is_named_or_zero_filled(fused_run, tmp_path):
  src = nib.load(os.path.join(fused_run["root"], "imagesTr", "case_000_0000.nii.gz"))
  folder = tmp_path / "flair_only"
  folder.mkdir()
  nib.save(src, folder / "flair.nii.gz")  # one channel: FLAIR, T1 missing
  workdir = fused_run["workdir"]
  code, err = _predict(workdir, folder, tmp_path / "out1")
  assert code == predict.EXIT_SOME_FAILED and "missing input channel T1" in err
  # Named channels that leave one missing, without asking for filling: one error line.
  code, err = _predict(workdir, folder, tmp_path / "out2", "--channels=FLAIR")
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == predict.EXIT_UNUSABLE and len(lines) == 1 and "T1" in lines[0]
  # The run trained with modality dropout: a zero-filled T1 is accepted when asked.
  code, err = _predict(workdir, folder, tmp_path / "out3", "--channels=FLAIR",
                       "--fill_missing_channels")
  assert code == predict.EXIT_OK, err
  seg = nib.load(tmp_path / "out3" / "flair_seg.nii.gz")
  assert seg.shape[:3] == src.shape[:3]
  row = open(tmp_path / "out3" / "predictions.csv").read().splitlines()[1]
  assert row.endswith("zero-filled channel T1")


def test_zero_filling_needs_a_run_trained_with_modality_dropout(fused_run, monkeypatch):
  segmenter = Segmenter(fused_run["workdir"])
  volume = Volume.from_affine(np.ones((12, 14, 10, 1), np.float32), np.eye(4))
  monkeypatch.setattr(Segmenter, "trained_with_dropout", False)
  with pytest.raises(ValueError, match="cannot zero-fill channel FLAIR: .*modality_dropout"):
    segmenter.predict(volume, mirror=False, channels=["T1"], fill_missing=True)
  with pytest.raises(ValueError, match="unknown"):
    segmenter.predict(volume, mirror=False, channels=["PET"])


def test_brats_config_variants():
  c = brats_fusion_unet.get_config("gated,dropout,runlocal")
  assert (c.model.kwargs.fusion, c.train.modality_dropout, c.train.steps) == ("gated", 0.25, 4)
  assert brats_fusion_unet.get_config().model.kwargs.fusion == "early"
  with pytest.raises(ValueError, match="one fusion"):
    brats_fusion_unet.get_config("late,gated")


def test_data_channels_reads_a_subset_into_the_plan(fused_run, tmp_path):
  """``data.channels``: the plan, the cache and the model input take only the channels named."""
  c = seg_config(fused_run["root"], **{"data.channels": ("T1",), "data.folds": 2})
  data = loop.build_data(c, str(tmp_path / "t1"))
  plan = json.load(open(tmp_path / "t1" / "plan.json"))
  assert plan["channels"] == ["T1"] and len(plan["normalization"]) == 1
  assert data.eval[0]["image"].shape[-1] == 1
  # An unknown name: one error naming the setting and the dataset's channels, nothing written.
  c = seg_config(fused_run["root"], **{"data.channels": ("T1", "PET")})
  with pytest.raises(ValueError, match=r"data.channels=\['T1', 'PET'\]: no channel 'PET' .*"
                                       r"its channels: FLAIR, T1") as e:
    loop.train_and_evaluate(c, str(tmp_path / "bad"))
  assert is_users_error(e.value) and not os.path.exists(tmp_path / "bad" / "plan.json")


def test_named_channels_the_run_does_not_take_are_left_out(fused_run):
  """A FLAIR + T1 run given FLAIR, T1 and PET: PET is dropped; a name that leaves one of the
  run's channels missing is still refused (it may be a typo of it)."""
  segmenter = Segmenter(fused_run["workdir"])
  rng = np.random.default_rng(0)
  two = Volume.from_affine(rng.normal(size=(12, 14, 10, 2)).astype(np.float32), np.eye(4))
  three = two.replace(array=np.concatenate([two.array[..., :1] * 9, two.array], -1))
  expected = segmenter.predict(two, mirror=False)
  got = segmenter.predict(three, mirror=False, channels=["PET", "FLAIR", "T1"])
  np.testing.assert_allclose(got.array, expected.array, atol=1e-6)
  with pytest.raises(ValueError, match="FLAR unknown"):
    segmenter.predict(two, mirror=False, channels=["FLAR", "T1"], fill_missing=True)


def test_brats_single_modality_variants():
  assert brats_fusion_unet.get_config("flair").data.channels == ("FLAIR",)
  assert brats_fusion_unet.get_config("t1,cpu").data.channels == ("T1",)
  assert brats_fusion_unet.get_config("late,cpu").data.channels == ()
  with pytest.raises(ValueError, match="one modality"):
    brats_fusion_unet.get_config("flair,late")
