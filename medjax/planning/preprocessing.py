"""Preprocessing to the plan, and the cache of preprocessed cases training memory-maps.

`preprocess` takes a case to the plan (canonical RAS → crop to nonzero → normalise → resample)
with what is needed to map a prediction back onto the original image (`restore_geometry`);
`prepare_cache` does it once per case into ``.npy`` files, `load_cached` reads them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from typing import Any, Sequence

import numpy as np

from medjax.data import transforms
from medjax.data.spatial import separate_z_axis
from medjax.io.atomic import atomic_open, atomic_write_json
from medjax.io.msd import MSDDataset, load_msd_case
from medjax.io.volume import Volume

_LOCATIONS_PER_CLASS = 10_000  # nnU-Net's: class locations kept per class, for oversampling
# nnU-Net's spline orders where its separate-z rule applies (the plan's separate_z_anisotropy):
# in-plane cubic for images, per-class linear for labels, linear for predicted probabilities;
# along the coarse axis nearest for all three.
_SEPARATE_Z = {"image": 3, "label": 1, "probabilities": 1, "z": 0}


def plan_hash(plan: dict[str, Any]) -> str:
  """Identifies what the cache depends on (spacing and normalisation, not the network)."""
  keys = ("target_spacing", "normalization", "foreground_intensity")
  values = {k: plan[k] for k in keys}
  if plan.get("separate_z_anisotropy") is not None:  # plans made before it resample without
    values["separate_z_anisotropy"] = plan["separate_z_anisotropy"]
  text = json.dumps(values, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def nonzero_box(array: np.ndarray) -> tuple[slice, ...]:
  """The bounding box of voxels where any channel is nonzero (all of it if none is)."""
  nz = np.nonzero(np.any(array != 0, axis=-1))
  if not len(nz[0]):
    return tuple(slice(0, n) for n in array.shape[:-1])
  return tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)


def _normalize(image: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
  """Per channel: CT → clip to the dataset's foreground 0.5–99.5 % and z-score with its
  foreground statistics; anything else → per-image z-score (nnU-Net's two schemes)."""
  out = np.empty(image.shape, np.float32)
  for c, scheme in enumerate(plan["normalization"]):
    x = image[..., c].astype(np.float64)
    if scheme == "ct":
      s = plan["foreground_intensity"][c]
      x = (np.clip(x, s["p00_5"], s["p99_5"]) - s["mean"]) / max(s["std"], 1e-8)
    else:
      x = (x - x.mean()) / max(x.std(), 1e-8)
    out[..., c] = x
  return out


def preprocess(image: Volume, label: Volume | None, plan: dict[str, Any]
               ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
  """One case → (image ``[*spatial, C]`` float32, label ``[*spatial, 1]`` uint8, properties).

  ``image`` and ``label`` are canonical (as `load_msd_case` returns them). The properties hold
  the crop box and shapes that `restore_geometry` needs to undo the steps. Where nnU-Net's
  separate-z rule applies (`medjax.data.spatial.separate_z_axis` at the plan's
  ``separate_z_anisotropy``), the coarse axis is resampled on its own, nearest, and the others
  slice by slice, cubic (image) and per-class linear (label); elsewhere linear and nearest.
  """
  box = nonzero_box(image.array)
  record = {"image": _normalize(image.array[box], plan), "spacing": image.spacing.copy()}
  if label is not None:
    record["label"] = np.ascontiguousarray(label.array[box], np.uint8)
  anisotropy = plan.get("separate_z_anisotropy")
  axis = (None if anisotropy is None else
          separate_z_axis(image.spacing, plan["target_spacing"], anisotropy))
  orders = {} if axis is None else {"order": _SEPARATE_Z["image"],
                                    "label_order": _SEPARATE_Z["label"], "z_axis": axis,
                                    "order_z": _SEPARATE_Z["z"]}
  resampled = transforms.Resample(spacing=tuple(plan["target_spacing"]), **orders).map(record)
  props = {"canonical_shape": list(image.shape), "box": [[s.start, s.stop] for s in box],
           "cropped_shape": [s.stop - s.start for s in box],
           "spacing": image.spacing.tolist(), "canonical_affine": image.affine.tolist(),
           "preprocessed_shape": list(resampled["image"].shape[:3]),
           "preprocessed_spacing": np.asarray(resampled["spacing"]).tolist(),
           "separate_z_anisotropy": anisotropy, "separate_z_axis": axis}
  return (np.ascontiguousarray(resampled["image"], np.float32),
          resampled.get("label"), props)


def restore_geometry(probabilities: np.ndarray, props: dict[str, Any],
                     regions: bool = False) -> np.ndarray:
  """Preprocessed-grid class probabilities ``[*spatial, K]`` → the canonical image's grid.

  Undoes the resampling (linear, on probabilities, so the argmax stays smooth; where nnU-Net's
  separate-z rule applies, linear in-plane and nearest along the coarse axis, as nnU-Net exports)
  and the crop (background outside the box: channel 0 of a softmax is 1 there; with ``regions``,
  sigmoid outputs, every channel is 0).
  """
  cropped = props["cropped_shape"]
  record = {"image": probabilities.astype(np.float32),
            "spacing": np.asarray(props["preprocessed_spacing"])}
  if list(probabilities.shape[:3]) != cropped:
    zoom = np.asarray(props["preprocessed_spacing"]) * np.asarray(probabilities.shape[:3])
    anisotropy = props.get("separate_z_anisotropy")
    axis = (None if anisotropy is None else
            separate_z_axis(props["preprocessed_spacing"], props["spacing"], anisotropy))
    orders = {} if axis is None else {"order": _SEPARATE_Z["probabilities"], "z_axis": axis,
                                      "order_z": _SEPARATE_Z["z"]}
    record = transforms.Resample(spacing=tuple(zoom / np.asarray(cropped)), **orders).map(record)
  restored = record["image"]
  if list(restored.shape[:3]) != cropped:  # rounding: crop/pad the last voxel
    restored = transforms.CropOrPad(shape=tuple(cropped), mode="edge").map(
        {"image": restored})["image"]
  out = np.zeros(tuple(props["canonical_shape"]) + (probabilities.shape[-1],), np.float32)
  if not regions:
    out[..., 0] = 1.0  # background where the crop removed (all-zero) voxels
  box = tuple(slice(a, b) for a, b in props["box"])
  out[box] = restored
  return out


def _locations(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
  """Up to `_LOCATIONS_PER_CLASS` voxel positions per foreground class: rows (class, i, j, k)."""
  rows = []
  seg = label[..., 0]
  for k in range(1, num_classes):
    where = np.argwhere(seg == k)
    if len(where) > _LOCATIONS_PER_CLASS:
      where = where[rng.choice(len(where), _LOCATIONS_PER_CLASS, replace=False)]
    rows.append(np.concatenate([np.full((len(where), 1), k), where], axis=1))
  return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def prepare_cache(dataset: MSDDataset, plan: dict[str, Any], cache_dir: str,
                  case_ids: Sequence[str] | None = None) -> str:
  """Preprocesses every case (or ``case_ids``) into ``cache_dir/<plan hash>/``; returns that path.

  Cases already there are kept, so a second run, or a resumed one, reads no NIfTI at all.
  Each file is written under a temporary name and renamed, so an interrupted run never leaves a
  half-written case behind.
  """
  folder = os.path.join(cache_dir, plan_hash(plan))
  os.makedirs(folder, exist_ok=True)
  for case in dataset.cases:
    if case_ids is not None and case.case_id not in case_ids:
      continue
    final = os.path.join(folder, f"{case.case_id}.json")
    if os.path.exists(final):
      continue
    image, label = load_msd_case(dataset, case)
    array, seg, props = preprocess(image, label, plan)
    _save(os.path.join(folder, f"{case.case_id}_image.npy"), array)
    if seg is not None:
      _save(os.path.join(folder, f"{case.case_id}_label.npy"), seg)
      _save(os.path.join(folder, f"{case.case_id}_locations.npy"),
            _locations(seg, plan["num_classes"],  # the ignore label is not a class
                       np.random.default_rng(zlib.crc32(case.case_id.encode()))))
    props.update(case_id=case.case_id, image_files=list(case.images), label_file=case.label)
    _save(final, props)  # written last: its presence marks a complete case
  return folder


def _save(path: str, value: np.ndarray | dict | list) -> None:
  """Writes ``path`` through a temporary file of this process and a rename: readers (and the
  other processes of a multi-host run, writing the same bytes) never see half a file."""
  if isinstance(value, np.ndarray):
    with atomic_open(path, "wb") as f:
      np.save(f, value)
  else:
    atomic_write_json(path, value, indent=1)


@dataclasses.dataclass(frozen=True)
class CachedCase:
  """A preprocessed case, memory-mapped: nothing is read until used."""

  case_id: str
  image: np.ndarray
  label: np.ndarray | None
  locations: np.ndarray
  props: dict[str, Any]


def load_cached(folder: str, case_id: str) -> CachedCase:
  with open(os.path.join(folder, f"{case_id}.json")) as f:
    props = json.load(f)
  label_path = os.path.join(folder, f"{case_id}_label.npy")
  has_label = os.path.exists(label_path)
  return CachedCase(
      case_id, np.load(os.path.join(folder, f"{case_id}_image.npy"), mmap_mode="r"),
      np.load(label_path, mmap_mode="r") if has_label else None,
      np.load(os.path.join(folder, f"{case_id}_locations.npy")) if has_label else
      np.zeros((0, 4), np.int32), props)
