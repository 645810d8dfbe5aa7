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
# # Train a chest X-ray classifier, evaluate it, and see where it looks
#
# PneumoniaMNIST (paediatric chest X-rays, 28², normal vs pneumonia) with the README's
# ResNet-18 recipe, trained by medjax's one training loop: the same `train_and_evaluate` that
# `python launch.py --config configs/pneumoniamnist_resnet18.py` runs, with the same workdir
# (checkpoints, `metrics.jsonl`, `results.md`, plots). Then the best checkpoint's confusion
# matrix and Grad-CAM maps on a few X-rays.
#
# The full recipe is 432 steps (about 7 minutes on 2 CPU cores, well under one on a GPU);
# `STEPS` below shortens it.

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

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from sklearn import metrics as skm

from configs import pneumoniamnist_resnet18
from medjax.infer.saliency import Explainer, write_overlay
from medjax.infer.trained import TrainedModel
from medjax.train import loop

STEPS = int(os.environ.get("NOTEBOOK_STEPS", 432))  # 432 = the full recipe (12 epochs)
DATA = os.environ.get("MEDJAX_DATA_DIR", "data")
print("JAX devices:", jax.devices())

# %% [markdown]
# ## Train
#
# The config is an `ml_collections.ConfigDict`; any field can be changed before the run, as
# `--config.a.b=value` does on the command line. Without a local copy of the data, the official
# file is downloaded (md5-checked).

# %%
config = pneumoniamnist_resnet18.get_config()
local = os.path.join(DATA, "medmnist")
if os.path.isdir(local):
  config.data.dir = local
else:
  config.data.download = True
config.train.steps = STEPS
config.eval.every_steps = max(STEPS // 4, 1)
workdir = tempfile.mkdtemp(prefix="pneumonia_")
summary = loop.train_and_evaluate(config, workdir)
print(json.dumps(summary["best"], indent=1))

# %% [markdown]
# ## What the run wrote
#
# The workdir is the whole record of the run: its config, checkpoints (the last few and the best
# on validation), `metrics.jsonl`, TensorBoard events, `results.md` and plots. Re-running the same
# call with the same workdir resumes from the last checkpoint, so nothing is trained twice.

# %%
print(sorted(os.listdir(workdir)))
print(open(os.path.join(workdir, "results.md")).read())
for name in sorted(os.listdir(os.path.join(workdir, "plots"))):
  fig, ax = plt.subplots(figsize=(9, 5))
  ax.imshow(plt.imread(os.path.join(workdir, "plots", name)))
  ax.set_title(name)
  ax.axis("off")
  plt.show()

# %% [markdown]
# ## Evaluate the best checkpoint on the validation split
#
# `TrainedModel.load` restores the checkpoint the loop selected and predicts with the run's own
# evaluation preprocessing (here averaged over left-right flips, as the loop evaluated).

# %%
trained = TrainedModel.load(workdir)
source = trained.source("val")
out = trained.predict(source, progress=False)
labels, probs = out["label"].ravel(), out["probs"][:, 1]
print(f"checkpoint step {trained.step}: val ACC {skm.accuracy_score(labels, probs > 0.5):.4f}, "
      f"AUC {skm.roc_auc_score(labels, probs):.4f} on {len(labels)} images")

skm.ConfusionMatrixDisplay.from_predictions(labels, probs > 0.5,
                                            display_labels=trained.class_names, colorbar=False)
plt.show()

# %% [markdown]
# ## Where does the model look? Grad-CAM
#
# `Explainer` computes Grad-CAM on the last feature map (jitted, batched), on the same
# normalised images the model saw. Maps are in [0, 1] on the input grid; `write_overlay` saves
# each X-ray beside its map as a PNG (what `medjax.infer.predict --saliency` writes).

# %%
transforms = trained.eval_transforms()
records = [source[i] for i in range(4)]
for t in transforms:
  records = [t.map(r) for r in records]
images = jnp.asarray(np.stack([r["image"] for r in records]), jnp.float32)
maps = Explainer.from_trained(trained).gradcam(images)
predicted = np.asarray(jnp.argmax(maps.logits, -1))
fig, axes = plt.subplots(2, 2, figsize=(12, 6.5))
for n, ax in enumerate(axes.ravel()):
  title = (f"true {trained.class_names[int(labels[n])]}, "
           f"predicted {trained.class_names[predicted[n]]}")
  path = os.path.join(workdir, "gradcam", f"val_{n}.png")
  write_overlay(path, source[n]["image"], np.asarray(maps.maps[n]), title)
  ax.imshow(plt.imread(path))
  ax.axis("off")
plt.tight_layout()
plt.show()
