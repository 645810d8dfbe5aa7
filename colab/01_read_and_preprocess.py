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
# # Reading and preprocessing medical images with medjax
#
# DICOM series, NIfTI volumes and MedMNIST arrays all arrive as one type: a `Volume`, voxels
# `[i, j, k, C]` with their spacing, origin and direction in world space (RAS+, mm). This notebook
# reads each kind, looks at it, and runs the preprocessing transforms the training pipelines use:
# CT windowing, resampling to a target spacing, cropping and padding.
#
# Data: `$MEDJAX_DATA_DIR` (the repository's `../shared/data` layout). Where a file is missing,
# the notebook writes a synthetic DICOM series and fetches the official MedMNIST file instead,
# so it runs top to bottom anywhere.

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
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from medjax.data import transforms
from medjax.io import Volume, dicom, medmnist, nifti, synthetic

DATA = os.environ.get("MEDJAX_DATA_DIR", "data")
print("data:", os.path.abspath(DATA), "(present)" if os.path.isdir(DATA) else "(absent)")


def show_planes(volume, title, channel=0, **imshow):
  """Axial, coronal and sagittal slices through the centre of a canonical (RAS+) volume."""
  a = volume.array[..., channel]
  i, j, k = (n // 2 for n in a.shape)
  sx, sy, sz = volume.spacing
  views = [("axial", a[:, :, k].T, sy / sx), ("coronal", a[:, j, :].T, sz / sx),
           ("sagittal", a[i, :, :].T, sz / sy)]
  fig, axes = plt.subplots(1, 3, figsize=(12, 4))
  for ax, (name, image, aspect) in zip(axes, views):
    ax.imshow(image, origin="lower", cmap="gray", aspect=aspect, **imshow)
    ax.set_title(name)
    ax.axis("off")
  fig.suptitle(title)
  plt.show()


# %% [markdown]
# ## 1. A CT series from DICOM files
#
# `read_dicom_series` sorts the slices by their position in space (not by file name or
# instance number), decodes compressed transfer syntaxes (here JPEG 2000 lossless) and applies
# the rescale to Hounsfield units. Patient identity never enters `Volume.metadata`.

# %%
series_dir = os.path.join(DATA, "dicom", "totalsegmentator_ct_series", "slices")
if not os.path.isdir(series_dir):
  series_dir = tempfile.mkdtemp(prefix="ct_")
  synthetic.write_ct_series(series_dir, synthetic.ct_phantom((24, 128, 128)))
  print("no local CT series: wrote a synthetic phantom to", series_dir)

for info in dicom.list_dicom_series(series_dir):
  print(f"{info.modality} series, {len(info.files)} files: {info.description!r}")
ct = dicom.read_dicom_series(series_dir, workers=1).to_canonical()
print(ct)
print("HU range:", ct.array.min(), "to", ct.array.max())
print("metadata keys:", sorted(ct.metadata))

# %%
show_planes(ct, "CT in HU (full range)")

# %% [markdown]
# ### CT windows
#
# `transforms.Window` clips to `level ± width/2` and maps that onto `[0, 1]`, with the usual
# presets. The same transform runs inside a Grain pipeline on `{"image": ...}` records.

# %%
presets = ["lung", "soft_tissue", "bone"]
k = ct.shape[2] // 2
fig, axes = plt.subplots(1, len(presets) + 1, figsize=(16, 4))
axes[0].hist(ct.array.ravel(), bins=200, color="grey")
axes[0].set_title("HU histogram")
axes[0].set_yscale("log")
for ax, preset in zip(axes[1:], presets):
  window = transforms.Window(preset=preset)
  shown = window.map({"image": ct.array})["image"]
  ax.imshow(shown[:, :, k, 0].T, origin="lower", cmap="gray", vmin=0, vmax=1)
  lo, hi = window.bounds
  ax.set_title(f"{preset}: [{lo:.0f}, {hi:.0f}] HU")
  ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. An MRI and its labels from NIfTI
#
# `read_nifti` reorders the axes to the closest RAS+ (so every volume looks the same way round)
# and keeps the affine; `read_nifti_labels` checks that a label map holds whole numbers. Here a
# case of the Medical Segmentation Decathlon's hippocampus task: 1 = anterior, 2 = posterior.

# %%
msd = os.path.join(DATA, "msd_task04_hippocampus")
if os.path.isdir(msd):
  case = sorted(os.listdir(os.path.join(msd, "imagesTr")))[0]
  mri = nifti.read_nifti(os.path.join(msd, "imagesTr", case), modality="MR")
  labels = nifti.read_nifti_labels(os.path.join(msd, "labelsTr", case), num_classes=3)
else:  # a synthetic stand-in: an ellipsoid with a core
  grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (36, 50, 36)),
                              indexing="ij"), -1)
  r = np.linalg.norm(grid / [0.5, 0.7, 0.4], axis=-1)
  seg = np.where(r < 0.5, 2, np.where(r < 1, 1, 0)).astype(np.int32)[..., None]
  mri = Volume(array=(50 + 40 * seg + np.random.default_rng(0).normal(0, 8, seg.shape))
                     .astype(np.float32), spacing=[1, 1, 1], origin=[0, 0, 0],
                     direction=np.eye(3), modality="MR")
  labels = mri.replace(array=seg)
  case = "synthetic"
print(case, mri)
values, counts = np.unique(labels.array, return_counts=True)
print("voxels per label:", dict(zip(values.tolist(), counts.tolist())))

# %%
image, seg = mri.array[..., 0], labels.array[..., 0]
k = int(np.argmax((seg > 0).sum(axis=(0, 1))))  # the axial slice with the most hippocampus
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
axes[0].imshow(image[:, :, k].T, origin="lower", cmap="gray")
axes[0].set_title(f"{case}, axial slice {k}")
axes[1].imshow(image[:, :, k].T, origin="lower", cmap="gray")
axes[1].imshow(np.ma.masked_equal(seg[:, :, k].T, 0), origin="lower", cmap="autumn", alpha=0.5,
               vmin=1, vmax=2)
axes[1].set_title("labels: anterior (red), posterior (yellow)")
for ax in axes:
  ax.axis("off")
plt.show()

# %% [markdown]
# ### Resampling, cropping and padding
#
# `Resample` moves image and label to a target spacing (linear for the image, nearest neighbour
# for the label, which keeps only the values it had). `CropOrPad` then fixes the shape, as a
# network's input needs. Each transform names itself and the problem when a record does not fit.

# %%
record = {"image": mri.array.astype(np.float32), "label": labels.array,
          "spacing": mri.spacing}
coarse = transforms.Resample(spacing=(2.0, 2.0, 2.0)).map(record)
fixed = transforms.CropOrPad(shape=(32, 32, 32)).map(coarse)
for name, r in (("original", record), ("2 mm", coarse), ("crop/pad to 32³", fixed)):
  print(f"{name:>16}: image {r['image'].shape}, labels {np.unique(r['label']).tolist()}, "
        f"spacing {np.round(r.get('spacing', coarse['spacing']), 3)}")

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, (name, r) in zip(axes, (("original", record), ("2 mm", coarse), ("32³", fixed))):
  z = r["image"].shape[2] // 2
  ax.imshow(r["image"][:, :, z, 0].T, origin="lower", cmap="gray")
  ax.contour(r["label"][:, :, z, 0].T, levels=[0.5, 1.5], colors=["r", "y"], linewidths=1)
  ax.set_title(f"{name}: {r['image'].shape[:3]}")
  ax.axis("off")
plt.show()

# %% [markdown]
# ## 3. MedMNIST arrays
#
# `load_medmnist` reads the official `.npz` layout and checks shapes, dtypes and label ranges;
# with `download=True` it fetches the official file (md5-checked) when no local copy exists.

# %%
local = os.path.join(DATA, "medmnist")
split = medmnist.load_medmnist("pneumoniamnist", "val",
                               data_dir=local if os.path.isdir(local) else None,
                               download=not os.path.isdir(local))
names = split.info.label_names
print(f"{len(split.labels)} val images {split.images.shape[1:]}, labels:", names)
fig, axes = plt.subplots(2, 8, figsize=(14, 4))
for n, ax in enumerate(axes.ravel()):
  ax.imshow(split.images[n, ..., 0], cmap="gray")
  ax.set_title(names[int(split.labels[n])], fontsize=9)
  ax.axis("off")
plt.show()
