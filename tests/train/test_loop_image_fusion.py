"""Learned pixel-level fusion: the fusion task through the training loop on a synthetic atlas,
and the trained run as the ``learned`` method of the fusion table and of the fuse CLI."""

import contextlib
import io
import os

import numpy as np
import pytest
from absl import flags
from conftest import write_fusion_atlas
from PIL import Image

from configs import harvard_fusion
from medjax.data import fusion, sources
from medjax.evaluate import fusion as evaluate_fusion
from medjax.infer import fuse
from medjax.io import harvard
from medjax.metrics.fusion import METRICS, score
from medjax.train import loop

CASES = {"CT-MRI": {2: 2, 3: 2, 5: 2, 28: 2}}


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
  """``(atlas root, workdir, summary)`` of the tiny ``runlocal`` fusion run (2 steps)."""
  root = write_fusion_atlas(str(tmp_path_factory.mktemp("atlas")), cases=CASES)
  workdir = str(tmp_path_factory.mktemp("fuse") / "run")
  config = harvard_fusion.get_config("ct-mri,runlocal")
  config.data.dir = root
  config.mesh.data = 1  # one device (helpers.config says why)
  return root, workdir, loop.train_and_evaluate(config, workdir)


def test_the_loop_trains_on_training_cases_and_selects_on_a_validation_case(fusion_run):
  root, workdir, summary = fusion_run
  assert summary["steps"] == 2 and tuple(summary["best"]) == METRICS
  assert all(np.isfinite(summary["best"][k]) for k in ("EN", "SD", "Qabf", "SSIM"))
  assert os.path.exists(os.path.join(workdir, "results.md"))
  splits = {s: sources.harvard_source(root, "CT-MRI", s) for s in ("train", "val", "test")}
  assert [len(s) for s in splits.values()] == [4, 2, 2]  # whole cases of 2 slices each
  image, label = splits["val"][0]["image"], splits["val"][0]["label"]
  assert image.shape == (32, 32, 2) and image.dtype == np.float32 and label.dtype == np.uint8
  np.testing.assert_array_equal(np.round(image * 255.0), label)
  val = harvard.validation_cases(root)["CT-MRI"]
  assert len(val) == 1 and val[0] not in harvard.split_of(root)["CT-MRI"]


def test_the_run_is_the_learned_method_of_the_table(fusion_run, tmp_path):
  root, workdir, _ = fusion_run
  results = evaluate_fusion.evaluate(root, str(tmp_path / "out"), ["CT-MRI"],
                                     ["pyramid", "learned"], workdirs=[workdir],
                                     figure_dir=str(tmp_path / "figures"), figure_rows=1)
  assert list(results[0]["mean"]) == ["pyramid", "learned"]
  pair = harvard.read_pairs(root, "CT-MRI", "test")[0]
  learned = fuse.load_learned(workdir)
  assert learned[0] == "CT-MRI"
  fused = fusion.to_uint8(fusion.fuse(pair.a, pair.b, learned[1]))
  row = next(r for r in results[0]["rows"] if r["method"] == "learned" and r["id"] == pair.id)
  assert [row[k] for k in ("Qabf", "VIF")] == pytest.approx(
      [score(fused, pair.a, pair.b)[k] for k in ("Qabf", "VIF")])
  assert os.path.exists(tmp_path / "figures" / "fusion_CT-MRI.png")
  with pytest.raises(ValueError, match="learned on PET-MRI: no --workdir run"):
    evaluate_fusion.evaluate(root, str(tmp_path / "out"), ["PET-MRI"], ["learned"],
                             workdirs=[workdir])


def _cli(*args):
  fv = flags.FlagValues()
  fuse.define_flags(fv)
  fv(["fuse", *args])
  stderr = io.StringIO()
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
    return fuse.main(["fuse"], fv), stderr.getvalue()


def test_the_cli_fuses_with_the_run_and_needs_its_workdir(fusion_run, tmp_path):
  root, workdir, _ = fusion_run
  mri, ct = f"{root}/CT-MRI/MRI", f"{root}/CT-MRI/CT"
  code, _ = _cli(f"--a={mri}", f"--b={ct}", f"--out={tmp_path}/o", "--method=learned",
                 f"--workdir={workdir}")
  assert code == 0
  written = np.asarray(Image.open(tmp_path / "o" / "learned" / "2001.png"))
  a, b = (harvard.read_image(f"{d}/2001.png") for d in (mri, ct))
  np.testing.assert_array_equal(
      written, fusion.to_uint8(fusion.fuse(a, b, fuse.load_learned(workdir)[1])))
  code, stderr = _cli(f"--a={mri}", f"--b={ct}", f"--out={tmp_path}/o", "--method=learned")
  assert code == 2 and stderr.strip() == "error: --method learned needs --workdir, a trained " \
      "fusion run"
  code, stderr = _cli(f"--a={mri}", f"--b={ct}", f"--out={tmp_path}/o", "--method=learned",
                      f"--workdir={tmp_path}/nothing")
  assert code == 2 and stderr.startswith("error: ") and "config.json" in stderr
