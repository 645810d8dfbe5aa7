"""Medical Segmentation Decathlon folders: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/``.

Both layouts in use are read: the original MSD release (one NIfTI per case, 4-D when there are
several modalities) and nnU-Net's (``case_0000.nii.gz``, ``case_0001.nii.gz``… one file per
channel). Labels are ``{"0": "background", ...}`` (MSD) or ``{"background": 0, ...}`` (nnU-Net v2).
Every problem is a `MedjaxIOError` naming the file: missing files, channels on different grids, a
label map that does not match its image, labels outside the declared classes, NaN or ±inf voxels.

A folder without ``dataset.json`` is read as an MSD dataset when it has a known case-folder layout
(`CASE_FOLDER_LAYOUTS`: one sub-folder per case holding one NIfTI per channel and the label map,
as the BraTS FLAIR + T1 set is shipped), so planning, training and inference see one kind of
dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import numpy as np

from medjax.io.errors import MedjaxIOError
from medjax.io.nifti import read_nifti, read_nifti_labels
from medjax.io.volume import Volume, grid_mismatch, nonfinite_problem


@dataclasses.dataclass(frozen=True)
class MSDCase:
  """One training case: its channel files (or one 4-D file) and its label map."""

  case_id: str
  images: tuple[str, ...]
  label: str | None


@dataclasses.dataclass(frozen=True)
class MSDDataset:
  """The contents of a ``dataset.json`` with every path resolved and checked to exist."""

  root: str
  name: str
  channels: tuple[str, ...]  # modality name per input channel, e.g. ("MRI",) or ("CT",)
  labels: tuple[str, ...]  # class names, index = label value; 0 is background
  cases: tuple[MSDCase, ...]
  # The channels the case files hold, when ``channels`` is a subset of them (`select_channels`).
  file_channels: tuple[str, ...] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.labels)

  def case(self, case_id: str) -> MSDCase:
    for c in self.cases:
      if c.case_id == case_id:
        return c
    raise KeyError(f"{self.root}: no case {case_id!r}")


def _case_id(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


def _labels(path: str, raw: dict) -> tuple[str, ...]:
  try:
    if all(str(k).isdigit() for k in raw):  # MSD: {"0": "background"}
      by_value = {int(k): str(v) for k, v in raw.items()}
    else:  # nnU-Net v2: {"background": 0}
      by_value = {int(v): str(k) for k, v in raw.items()}
  except (TypeError, ValueError) as e:
    raise MedjaxIOError(path, f"'labels' must map values to names: {raw}") from e
  if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
    raise MedjaxIOError(path, f"labels must be 0..K-1 with K >= 2, got values {sorted(by_value)}")
  return tuple(by_value[k] for k in range(len(by_value)))


@dataclasses.dataclass(frozen=True)
class CaseFolderLayout:
  """``<root>/<case>/<channel>.nii.gz`` for each of ``channels`` and ``<label>.nii.gz``."""

  channels: tuple[str, ...]  # file stems, which are also the channel (modality) names
  label: str
  labels: tuple[str, ...]  # class names, index = label value


# BraTS 2018 FLAIR + T1 with the whole-tumour mask, as in the deepvoxnet2 demos
# ($MEDJAX_DATA_DIR/brats2018_flair_t1/case_<i>/{FLAIR,T1,GT_W}.nii.gz; see SOURCES.md there).
CASE_FOLDER_LAYOUTS = {
    "brats_flair_t1": CaseFolderLayout(("FLAIR", "T1"), "GT_W", ("background", "tumour")),
}


def _natural_key(name: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _case_folder_dataset(root: str) -> MSDDataset | None:
  """``root`` read through the first `CASE_FOLDER_LAYOUTS` entry that its first case folder
  matches, or None when none does (or ``root`` has no sub-folders)."""
  try:
    folders = sorted((n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))),
                     key=_natural_key)
  except OSError:
    return None
  for layout in CASE_FOLDER_LAYOUTS.values():
    def files(folder: str, layout: CaseFolderLayout = layout) -> list[str]:
      names = (*layout.channels, layout.label)  # the channels, then the label map
      return [os.path.join(root, folder, f"{n}.nii.gz") for n in names]

    if not folders or not all(map(os.path.isfile, files(folders[0]))):
      continue
    cases = []
    for folder in folders:
      paths = files(folder)
      for p in paths:
        if not os.path.isfile(p):
          raise MedjaxIOError(p, "missing (the first case folder holds it)")
      cases.append(MSDCase(folder, tuple(paths[:-1]), paths[-1]))
    return MSDDataset(root, os.path.basename(os.path.normpath(root)), layout.channels,
                      layout.labels, tuple(cases))
  return None


def read_msd_dataset(root: str | os.PathLike) -> MSDDataset:
  """Reads ``root/dataset.json`` and resolves every training case's files (a folder without one:
  through `CASE_FOLDER_LAYOUTS`)."""
  root = os.fspath(root)
  path = os.path.join(root, "dataset.json")
  if not os.path.exists(path):
    dataset = _case_folder_dataset(root)
    if dataset is not None:
      return dataset
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError as e:
    raise MedjaxIOError(path, "no dataset.json (is this an MSD/nnU-Net dataset folder?)") from e
  except (OSError, ValueError) as e:
    raise MedjaxIOError(path, f"unreadable JSON ({e})") from e
  modality = meta.get("modality") or meta.get("channel_names")
  if not isinstance(modality, dict) or not modality:
    raise MedjaxIOError(path, "needs 'modality' (MSD) or 'channel_names' (nnU-Net)")
  channels = tuple(str(modality[k]) for k in sorted(modality, key=int))
  if "labels" not in meta or not isinstance(meta["labels"], dict):
    raise MedjaxIOError(path, "needs a 'labels' mapping")
  labels = _labels(path, meta["labels"])
  entries = meta.get("training")
  if entries is None:  # nnU-Net v2 lists no cases: they are the files in imagesTr/labelsTr
    folder = os.path.join(root, "labelsTr")
    if not os.path.isdir(folder):
      raise MedjaxIOError(path, "no 'training' list and no labelsTr/ folder")
    entries = [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"}
               for n in sorted(os.listdir(folder)) if n.endswith((".nii", ".nii.gz"))]
  cases = []
  for entry in entries:
    try:
      image, label = entry["image"], entry.get("label")
    except (TypeError, KeyError) as e:
      raise MedjaxIOError(path, f"a 'training' entry lacks 'image': {entry}") from e
    image = os.path.normpath(os.path.join(root, image))
    if os.path.isfile(image):
      images = (image,)
    else:  # nnU-Net naming: one file per channel next to where the 4-D file would be
      stem = _case_id(image)
      suffix = image[len(os.path.join(os.path.dirname(image), stem)):]
      images = tuple(os.path.join(os.path.dirname(image), f"{stem}_{c:04d}{suffix}")
                     for c in range(len(channels)))
      missing = [p for p in images if not os.path.isfile(p)]
      if missing:
        raise MedjaxIOError(image, f"missing (nor found as {os.path.basename(missing[0])})")
    label_path = os.path.normpath(os.path.join(root, label)) if label else None
    if label_path and not os.path.isfile(label_path):
      raise MedjaxIOError(label_path, "label file listed in dataset.json is missing")
    cases.append(MSDCase(_case_id(image), images, label_path))
  if not cases:
    raise MedjaxIOError(path, "no training cases")
  ids = [c.case_id for c in cases]
  if len(set(ids)) != len(ids):
    raise MedjaxIOError(path, "duplicate case ids in 'training'")
  return MSDDataset(root, str(meta.get("name", os.path.basename(root))), channels, labels,
                    tuple(cases))


def select_channels(dataset: MSDDataset, names: Sequence[str]) -> MSDDataset:
  """``dataset`` reading only the channels ``names`` (in that order); empty: all of them.

  Raises:
    ValueError: a name the dataset has no channel of, or a repeated one (``data.channels``).
  """
  names = tuple(names or ())
  if not names:
    return dataset
  held = dataset.file_channels or dataset.channels
  unknown = [n for n in names if n not in held]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"data.channels={list(names)}: "
                     + (f"no channel {', '.join(map(repr, unknown))}" if unknown
                        else "a channel named twice")
                     + f" in {dataset.root} (its channels: {', '.join(held)})")
  return dataclasses.replace(dataset, channels=names, file_channels=held)


def load_msd_case(dataset: MSDDataset, case: MSDCase) -> tuple[Volume, Volume | None]:
  """The case's image (one channel per modality, canonical RAS) and its label map (or None)."""
  held = dataset.file_channels or dataset.channels
  keep = [held.index(c) for c in dataset.channels]  # `select_channels`: a subset, reordered
  images = case.images
  if len(images) == len(held) > 1:  # one file per channel: read only the selected ones
    images, keep = tuple(images[k] for k in keep), list(range(len(keep)))
  parts = [read_nifti(p, modality=dataset.channels[0]) for p in images]
  for p, v in zip(images, parts):  # NaN would train and score as silently wrong numbers
    problem = nonfinite_problem(v.array)
    if problem:
      raise MedjaxIOError(p, problem)
  for p, v in zip(images[1:], parts[1:]):
    problem = grid_mismatch(parts[0], v)
    if problem:
      raise MedjaxIOError(p, f"channel not on the grid of {os.path.basename(images[0])}: "
                          f"{problem}")
  image = parts[0] if len(parts) == 1 else parts[0].replace(
      array=np.concatenate([v.array for v in parts], axis=-1))
  if keep != list(range(image.channels)) and image.channels == len(held):  # a 4-D file
    image = image.replace(array=image.array[..., keep])
  if image.channels != len(dataset.channels):
    raise MedjaxIOError(images[0], f"{image.channels} channel(s), dataset.json declares "
                        f"{len(dataset.channels)} ({', '.join(dataset.channels)})")
  if case.label is None:
    return image, None
  label = read_nifti_labels(case.label, num_classes=dataset.num_classes)
  problem = grid_mismatch(image, label)
  if problem:
    raise MedjaxIOError(case.label, f"label map not on its image's grid: {problem}")
  return image, label
