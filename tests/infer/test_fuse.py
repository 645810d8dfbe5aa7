"""``python -m medjax.infer.fuse``: fused PNGs per method, the figure, and one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, write_fusion_atlas
from helpers import run_cli
from PIL import Image

from medjax.data import fusion
from medjax.infer import fuse


def _run(*args):
  return run_cli(fuse, *args)


@pytest.fixture
def atlas(tmp_path):
  return write_fusion_atlas(str(tmp_path / "atlas"), cases={"PET-MRI": {25: 2}, "CT-MRI": {2: 1}})


def test_folders_are_fused_per_method_with_a_figure(atlas, tmp_path):
  out = str(tmp_path / "out")
  code, stdout, _ = _run(f"--a={atlas}/PET-MRI/MRI", f"--b={atlas}/PET-MRI/PET", f"--out={out}",
                         "--method=mean,wavelet", "--figure")
  assert code == 0 and "2 pair(s), 4 image(s)" in stdout
  assert sorted(os.listdir(out)) == ["figure.png", "mean", "wavelet"]
  assert sorted(os.listdir(os.path.join(out, "wavelet"))) == ["25001.png", "25002.png"]
  written = np.asarray(Image.open(os.path.join(out, "mean", "25002.png")))
  a = np.asarray(Image.open(os.path.join(atlas, "PET-MRI", "MRI", "25002.png")))
  b = np.asarray(Image.open(os.path.join(atlas, "PET-MRI", "PET", "25002.png")))
  np.testing.assert_array_equal(written, fusion.to_uint8(fusion.fuse(a, b, "mean")))
  assert written.shape == (32, 32, 3)  # PET is colour: so is the fused image
  assert Image.open(os.path.join(out, "figure.png")).size[0] > 4 * 32


def test_two_files_make_one_pair(atlas, tmp_path):
  code, _, _ = _run(f"--a={atlas}/CT-MRI/MRI/2001.png", f"--b={atlas}/CT-MRI/CT/2001.png",
                    f"--out={tmp_path}/o")
  assert code == 0
  assert np.asarray(Image.open(tmp_path / "o" / "pyramid" / "2001.png")).shape == (32, 32)


def test_each_problem_is_one_error_line_and_exit_status_2(atlas, tmp_path):
  mri, ct = f"{atlas}/CT-MRI/MRI", f"{atlas}/CT-MRI/CT"
  small = tmp_path / "small"
  small.mkdir()
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(small / "2001.png")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "2001.png").write_bytes(b"\x89PNG\r\n\x1a\n nothing more")
  cases = {
      "sizes": ([f"--a={mri}", f"--b={small}"], "32x32"),
      "unreadable": ([f"--a={mri}", f"--b={broken}"], "unreadable image"),
      "missing": ([f"--a={mri}", f"--b={tmp_path}/nowhere"], "no such file or folder"),
      "unpaired": ([f"--a={mri}", f"--b={atlas}/PET-MRI/PET"], "no namesake"),
      "file and folder": ([f"--a={mri}/2001.png", f"--b={ct}"], "two folders or two files"),
      "method": ([f"--a={mri}", f"--b={ct}", "--method=median"], "unknown fusion method"),
  }
  for name, (args, message) in cases.items():
    code, _, stderr = _run(*args, f"--out={tmp_path}/o")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, name
    assert lines[0].startswith("error: ") and message in lines[0], (name, lines)


def test_the_module_runs_as_a_command(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "medjax.infer.fuse", f"--a={tmp_path}/x", f"--b={tmp_path}/y",
       f"--out={tmp_path}/o"], capture_output=True, text=True, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO})
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: {tmp_path}/x: no such file or folder"]
