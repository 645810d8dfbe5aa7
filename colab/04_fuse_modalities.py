# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Fusing two modalities into one image
#
# A CT shows bone, an MRI soft tissue, a PET the metabolism: one fused picture lets a reader see
# both at once. This notebook fuses co-registered pairs of the Harvard Whole Brain Atlas (the
# images the medical image fusion papers use) with each of medjax's methods, shows them side by
# side, and scores them with the eight metrics of the field (EN, SD, SF, MI, SCD, VIF, Qabf,
# SSIM, computed as CDDFuse's evaluation code does). Beside the classical rules, it trains
# medjax's learned fusion network (DenseFuse-style, `configs/harvard_fusion.py`) on each pair
# folder and adds it to the figure and the table.
#
# Data: `$MEDJAX_DATA_DIR/fusion/harvard_aanlib/{CT-MRI,PET-MRI,SPECT-MRI}/` (see the
# repository's `docs/fusion.md`). Pairs come from the test split: whole cases kept out of any
# training.

# %%
# Find the medjax checkout (this notebook's parent folder), or on Colab clone and install it.
import os
import subprocess
import sys

MEDJAX_GIT = "https://github.com/medjax/medjax"  # where your copy of medjax lives
REPO = next((p for p in (".", "..", "medjax") if os.path.exists(os.path.join(p, "launch.py"))),
            None)
if REPO is None:
  subprocess.run(["git", "clone", "-q", "--depth=1", MEDJAX_GIT, "medjax"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "medjax"], check=True)
  REPO = "medjax"
os.chdir(REPO)  # relative data paths are read from the repository's root
sys.path.insert(0, os.getcwd())

# %%
import matplotlib.pyplot as plt
import numpy as np

from medjax.data import fusion
from medjax.io import harvard
from medjax.metrics.fusion import METRICS, score

DATA = os.environ.get("MEDJAX_DATA_DIR", "data")
ROOT = os.path.join(DATA, "fusion", "harvard_aanlib")
if not os.path.isdir(os.path.join(ROOT, "CT-MRI")):
  raise SystemExit(f"{ROOT}: the Harvard atlas pairs are missing (see docs/fusion.md for where "
                   "they come from)")
print("test cases per pair folder:", harvard.split_of(ROOT))

# %% [markdown]
# ## One CT-MRI and one PET-MRI pair
#
# `harvard.read_pairs` gives each pair as uint8 arrays: `a` the MRI, `b` the CT (grey) or the PET
# (colour). A colour source is fused through its luminance (YCbCr Y, as the papers do) and its
# colour is put back afterwards.

# %%
ct_pairs = harvard.read_pairs(ROOT, "CT-MRI", "test")
pet_pairs = harvard.read_pairs(ROOT, "PET-MRI", "test")
chosen = [ct_pairs[len(ct_pairs) // 2], pet_pairs[len(pet_pairs) // 2]]
for p in chosen:
  print(p.id, p.modalities, p.a.shape, p.b.shape)

# %% [markdown]
# ## Every method on both pairs
#
# `mean` and `max` are the trivial rules; `pyramid` (Laplacian pyramid) and `wavelet` (discrete
# wavelet transform, PyWavelets) keep the larger detail coefficient of the two sources at every
# scale and average the coarsest level.

# %%
fused = {p.id: {m: fusion.to_uint8(fusion.fuse(p.a, p.b, m)) for m in fusion.METHODS}
         for p in chosen}

# %% [markdown]
# ## A learned fusion network
#
# `dense_fusion` (DenseFuse's encoder, dense block and decoder) learns without targets: its loss
# asks the fused image to keep both sources' structure (SSIM), the stronger source's edges
# (Sobel gradients) and the brighter source's intensity. medjax's training loop trains one
# network per pair folder on its training cases and keeps the checkpoint with the best Qabf on
# a validation case; the test cases shown here are never seen. `STEPS` is the recipe's 600 steps
# (10 to 14 minutes per pair on a 2-core CPU); the notebook's slow test runs 2, whose network is
# untrained, and its default test none. The same model from the command line:
# `python -m medjax.infer.fuse --method learned --workdir <run> --a MRI/ --b CT/ --out fused/`.

# %%
import tempfile

from configs import harvard_fusion
from medjax.infer.fuse import LEARNED, load_learned
from medjax.train import loop

STEPS = int(os.environ.get("NOTEBOOK_STEPS", 600))  # 600 = the full recipe; 0: no training
if not STEPS:
  print("NOTEBOOK_STEPS=0: no learned network; the figure and table keep the classical methods")
for p in chosen if STEPS else []:
  config = harvard_fusion.get_config(p.pair.lower())
  config.data.dir = ROOT
  config.train.steps = STEPS
  config.eval.every_steps = min(config.eval.every_steps, STEPS)
  workdir = tempfile.mkdtemp(prefix=f"fuse_{p.pair}_")
  summary = loop.train_and_evaluate(config, workdir)
  print(f"{p.pair}: {summary['steps']} steps in {summary['train_seconds']:.0f} s, best "
        f"validation Qabf {summary['best']['Qabf']:.3f} (step {summary['best_step']})")
  _, network = load_learned(workdir)
  fused[p.id][LEARNED] = fusion.to_uint8(fusion.fuse(p.a, p.b, network))

# %% [markdown]
# ## The figure

# %%
for p in chosen:
  panels = [(p.modalities[0], p.a), (p.modalities[1], p.b), *fused[p.id].items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
  for ax, (name, image) in zip(axes, panels):
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_title(name)
    ax.axis("off")
  fig.suptitle(p.id)
  plt.show()

# %% [markdown]
# ## The metric table
#
# Scored on grey levels as the field's evaluation code does. Several of these metrics reward
# copying a source or raw contrast (max fusion scores high on MI, SD, VIF and SSIM without adding
# anything); Qabf, the share of the sources' edges the fused image keeps, is the one to watch on
# CT-MRI. `docs/fusion.md` has the table over the whole test split, beside published figures
# (the learned rows there are of the full 600-step runs).

# %%
print(f"{'pair':<18}{'method':<10}" + "".join(f"{m:>8}" for m in METRICS))
for p in chosen:
  for method, image in fused[p.id].items():
    s = score(image, p.a, p.b)
    assert all(np.isfinite(s[m]) for m in METRICS), (p.id, method, s)
    print(f"{p.id:<18}{method:<10}" + "".join(f"{s[m]:8.3f}" for m in METRICS))
