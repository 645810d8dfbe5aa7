# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Segment the hippocampus in 3-D, nnU-Net style
#
# The Medical Segmentation Decathlon's hippocampus task (MRI; labels 1 = anterior,
# 2 = posterior). medjax fingerprints the dataset and plans the preprocessing and the network
# (`plan.json`), trains a 3-D U-Net on patches with deep supervision in the same training loop
# as every other task, then predicts the validation fold with a Gaussian-weighted sliding window
# and mirroring, and scores Dice and HD95 in millimetres.
#
# The full recipe (`configs/hippocampus_unet3d.py`, 1,800 steps) reaches a mean Dice of about
# 0.88 in 12 minutes on 2 CPU cores with AVX-512; `STEPS` below shortens it (250 steps gave
# 0.82 after 10 minutes of training on 2 AVX2 cores).
#
# Data: `$MEDJAX_DATA_DIR/msd_task04_hippocampus` (`dataset.json`, `imagesTr/`, `labelsTr/`),
# e.g. the `Task04_Hippocampus` folder of the Decathlon's download, renamed.

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
os.chdir(REPO)  # configs/ and relative data paths are read from the repository's root
sys.path.insert(0, os.getcwd())

# %%
import json
import tempfile

from medjax import host

host.prepare()  # as launch.py does, before JAX starts: one CPU device per core on a CPU machine

import matplotlib.pyplot as plt
import numpy as np

from configs import hippocampus_unet3d
from medjax.infer import segment
from medjax.io import msd
from medjax.train import builders, loop

STEPS = int(os.environ.get("NOTEBOOK_STEPS", 1800))  # 1800 = the full recipe
MSD = os.path.join(os.environ.get("MEDJAX_DATA_DIR", "data"), "msd_task04_hippocampus")
if not os.path.exists(os.path.join(MSD, "dataset.json")):
  raise FileNotFoundError(f"{MSD}: no dataset.json. Download Task04_Hippocampus from "
                          "http://medicaldecathlon.com and set MEDJAX_DATA_DIR to its parent "
                          "folder, with the task folder renamed msd_task04_hippocampus")
dataset = msd.read_msd_dataset(MSD)
print(f"{len(dataset.cases)} training cases, classes {dataset.labels}")

# %% [markdown]
# ## Train
#
# The plan is made from the data on the first run and written to the workdir; any of its
# fields can be overridden from the config (`config.data.plan`).

# %%
config = hippocampus_unet3d.get_config()
config.data.dir = MSD
config.train.steps = STEPS
config.eval.every_steps = max(STEPS // 4, 1)
workdir = tempfile.mkdtemp(prefix="hippocampus3d_")
summary = loop.train_and_evaluate(config, workdir)
print(f"{summary['steps']} steps in {summary['train_seconds']:.0f} s; best pseudo Dice on val "
      f"patches: {summary['best']['dice']:.3f}")
plan = json.load(open(os.path.join(workdir, "plan.json")))
for key in ("target_spacing", "patch_size", "normalization"):
  print(f"plan {key}: {plan[key]}")
# The network: the plan's widths and strides, under the config's own (here widths 16-128).
print("U-Net:", {**builders.plan_model_defaults(plan), **config.model.kwargs.to_dict()})

# %% [markdown]
# ## Validate the fold: sliding window, mirroring, Dice and HD95
#
# `segment.validate` is what `launch.py` runs after training: every validation case predicted
# on its own grid, written as NIfTI, scored per class, summarised in `results.md`.

# %%
result = segment.validate(workdir)
print(f"{result['cases']} cases in {result['seconds']:.0f} s; Dice per class:",
      {k: round(v, 3) for k, v in result["per_class_dice"].items()})
print("## Validation" + open(os.path.join(workdir, "results.md")).read().split("## Validation")[-1])

# %%
val = os.path.join(workdir, "validation")
pictures = [os.path.join(val, "dice_boxes.png")] + sorted(
    os.path.join(val, "overlays", n) for n in os.listdir(os.path.join(val, "overlays")))
for path in pictures:
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.imshow(plt.imread(path))
  ax.axis("off")
  plt.show()

# %% [markdown]
# ## Predict a new image
#
# `Segmenter` takes any `Volume` (read from NIfTI or DICOM) and returns class probabilities on
# that image's own grid and orientation: here one validation case, with the probability of
# each class through the slice with the most hippocampus.

# %%
case_id = json.load(open(os.path.join(workdir, "splits.json")))[config.data.fold]["val"][0]
image, label = msd.load_msd_case(dataset, dataset.case(case_id))
probs = segment.Segmenter(workdir).predict(image)
k = int(np.argmax((label.array[..., 0] > 0).sum(axis=(0, 1))))
fig, axes = plt.subplots(1, 4, figsize=(15, 4))
axes[0].imshow(image.array[:, :, k, 0].T, origin="lower", cmap="gray")
axes[0].set_title(f"{case_id}, slice {k}")
for c, ax in zip((1, 2), axes[1:3]):
  shown = ax.imshow(probs.array[:, :, k, c].T, origin="lower", vmin=0, vmax=1)
  ax.set_title(f"P({plan['class_names'][c]})")
fig.colorbar(shown, ax=axes[1:3], fraction=0.03)
axes[3].imshow(image.array[:, :, k, 0].T, origin="lower", cmap="gray")
axes[3].contour(label.array[:, :, k, 0].T, levels=[0.5], colors="w", linewidths=1)
axes[3].imshow(np.ma.masked_equal(np.argmax(probs.array[:, :, k], -1).T, 0), origin="lower",
               cmap="autumn", alpha=0.5, vmin=1, vmax=2)
axes[3].set_title("prediction (colour), reference (white)")
for ax in axes:
  ax.axis("off")
plt.show()
