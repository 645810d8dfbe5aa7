"""The colab/ notebooks: each ``.ipynb`` is its jupytext script's pair, and each runs top to bottom."""

import glob
import os
import subprocess
import sys

import jupytext
import pytest
from helpers import tail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "colab", "*.py")))
DATA = os.environ.get("MEDJAX_DATA_DIR", "")
# Notebooks that train: 2.5-3 minutes each on 2 cores even at 2 steps (compiling the train,
# evaluation and Grad-CAM programs), so `pytest -m slow` runs them (.ci/run does when time allows).
TRAINING = {"02_classify_and_explain.py", "03_segment_hippocampus.py"}
# Notebooks whose training cell alone is slow: the default suite runs them with NOTEBOOK_STEPS=0,
# which skips it, and `pytest -m slow` with 2 steps (04's learned fusion: 1.5 minutes a pair,
# mostly scoring its validation slices).
TRAINING_CELL = {"04_fuse_modalities.py"}
# The file of $MEDJAX_DATA_DIR each reads (without it they download it, or stop saying where to
# get it; tests make no downloads).
NEEDS = {"03_segment_hippocampus.py": "msd_task04_hippocampus/dataset.json",
         "04_fuse_modalities.py": "fusion/harvard_aanlib/PET-MRI"}


def _cells(notebook):
  return [(c.cell_type, c.source.strip()) for c in notebook.cells]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_notebook_pairs_its_script_without_outputs(script):
  notebook = script[:-len(".py")] + ".ipynb"
  assert os.path.exists(notebook), f"{notebook} is missing: jupytext --sync {script}"
  paired = jupytext.read(notebook)
  assert _cells(paired) == _cells(jupytext.read(script)), (
      f"{notebook} and {script} differ: edit the script, then jupytext --sync {script}")
  outputs = [c for c in paired.cells if c.get("outputs")]
  assert not outputs, f"{notebook} holds outputs: strip them before committing"


def _runs():
  for s in SCRIPTS:
    name = os.path.basename(s)
    if name in TRAINING_CELL:
      yield pytest.param(s, "0", id=name)
    yield pytest.param(s, "2", id=name + ("-train" if name in TRAINING_CELL else ""),
                       marks=[pytest.mark.slow] if name in TRAINING | TRAINING_CELL else [])


@pytest.mark.parametrize("script,steps", list(_runs()))
def test_runs_top_to_bottom(script, steps, tmp_path):
  needs = NEEDS.get(os.path.basename(script), "medmnist/pneumoniamnist.npz")
  if not os.path.exists(os.path.join(DATA, needs)):
    pytest.skip(f"needs $MEDJAX_DATA_DIR/{needs}")
  # Figures go to the Agg backend; the training notebooks run 2 steps instead of their recipes.
  env = {**os.environ, "MPLBACKEND": "Agg", "NOTEBOOK_STEPS": steps, "TMPDIR": str(tmp_path),
         "MEDJAX_DATA_DIR": os.path.abspath(DATA)}
  done = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, tail(done.stdout + done.stderr, 40)
