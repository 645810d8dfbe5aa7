"""Segmentation data, nnU-Net style: fingerprint → plan → preprocessed cache → folds → patches.

- `fingerprint` summarises a dataset (spacings, shapes, foreground intensities, class sizes).
- `make_plan` turns it into the decisions nnU-Net's planner makes: target spacing, patch size,
  down-sampling strides per stage, feature widths, normalisation per channel. The plan is JSON in
  the workdir; any key can be overridden from the config.
- `prepare_cache` preprocesses every case once (canonical RAS → crop to nonzero → normalise →
  resample) into ``.npy`` files that training memory-maps, with what is needed to map a
  prediction back onto the original image (`restore_geometry`).
- `make_folds` writes a seeded k-fold split once and reuses it.
- `CaseSource` reads cached cases; the ``patch`` transform samples training patches with
  foreground oversampling, padding where a patch leaves the volume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from typing import Any, Sequence

import grain
import numpy as np
from sklearn.model_selection import KFold

from medjax import registry
from medjax.data import transforms
from medjax.io.atomic import atomic_open, atomic_write_json
from medjax.io.errors import MedjaxIOError
from medjax.io.msd import MSDDataset, load_msd_case
from medjax.io.volume import Volume

# nnU-Net's constants: foreground intensity samples per case, class locations kept per class,
# the smallest feature map edge of the U-Net, the cap on feature widths, anisotropy threshold.
_INTENSITY_SAMPLES = 10_000
_LOCATIONS_PER_CLASS = 10_000
_MIN_FEATURE_EDGE = 4
_MAX_FEATURES = 320
_ANISOTROPY = 3.0


def fingerprint(dataset: MSDDataset) -> dict[str, Any]:
  """Spacings, shapes (after cropping to nonzero), foreground intensities and class sizes."""
  rng = np.random.default_rng(1234)
  spacings, shapes, samples, class_voxels = [], [], [], np.zeros(dataset.num_classes, np.int64)
  for case in dataset.cases:
    image, label = load_msd_case(dataset, case)
    box = _nonzero_box(image.array)
    spacings.append(image.spacing.tolist())
    shapes.append([s.stop - s.start for s in box])
    if label is not None:
      seg = label.array[..., 0]
      class_voxels += np.bincount(seg.ravel(), minlength=dataset.num_classes)[:dataset.num_classes]
      voxels = image.array[seg > 0]
      if len(voxels):
        take = rng.choice(len(voxels), min(len(voxels), _INTENSITY_SAMPLES), replace=False)
        samples.append(voxels[take].astype(np.float64))
  stats = []
  pooled = np.concatenate(samples) if samples else np.zeros((1, len(dataset.channels)))
  for c in range(len(dataset.channels)):
    x = pooled[:, c]
    stats.append({"mean": float(x.mean()), "std": float(x.std()),
                  "p00_5": float(np.percentile(x, 0.5)), "p99_5": float(np.percentile(x, 99.5))})
  return {"dataset": dataset.name, "cases": len(dataset.cases), "spacings": spacings,
          "shapes": shapes, "median_spacing": np.median(spacings, 0).tolist(),
          "median_shape": np.median(shapes, 0).tolist(), "foreground_intensity": stats,
          "class_voxels": class_voxels.tolist(), "channels": list(dataset.channels),
          "class_names": list(dataset.labels)}


def make_plan(fp: dict[str, Any], dims: int = 3, max_patch_voxels: int = 40 * 56 * 40,
              base_features: int = 32, overrides: dict[str, Any] | None = None
              ) -> dict[str, Any]:
  """nnU-Net's planning rules, simplified to one configuration per ``dims`` (2 or 3).

  Target spacing is the median; on strongly anisotropic data (> 3×) the coarse axis takes the
  10th percentile instead, as nnU-Net does. The patch starts at the median shape at that spacing
  and shrinks (largest relative axis first) to ``max_patch_voxels`` (3-D) or its square root
  (2-D). Each axis is halved while its feature map stays ≥ 4 voxels (at most 5 times) and its
  voxels are at most twice as coarse as the finest axis's, and the patch is rounded up to a
  multiple of its total stride. 2-D plans slice along the coarsest axis (axis 0 on
  isotropic data) and keep the other two.
  """
  if dims not in (2, 3):
    raise ValueError(f"plan dims must be 2 or 3, got {dims}")
  spacings = np.asarray(fp["spacings"], np.float64)
  target = np.median(spacings, 0)
  coarse = int(np.argmax(target))
  if target[coarse] > _ANISOTROPY * np.min(target):
    target[coarse] = np.percentile(spacings[:, coarse], 10)
  shape = np.asarray(fp["median_shape"], np.float64) * np.asarray(fp["median_spacing"]) / target
  slice_axis = None
  if dims == 2:
    slice_axis = coarse if target[coarse] > np.min(target) * 1.001 else 0
    shape = np.delete(shape, slice_axis)
    budget = max_patch_voxels / 4  # 2-D patches cost far less per voxel: keep whole slices
  else:
    budget = max_patch_voxels
  patch = np.maximum(np.round(shape), 1.0)
  while np.prod(patch) > budget:
    patch[np.argmax(patch / shape)] -= 1
  spacing = np.delete(target, slice_axis) if dims == 2 else target
  pools = np.zeros(len(patch), int)
  while True:
    can = (patch / 2 ** (pools + 1) >= _MIN_FEATURE_EDGE) & (pools < 5)
    current = spacing * 2.0**pools
    can &= current <= 2 * current.min()  # coarse axes wait until the fine ones catch up
    if not can.any():
      break
    pools[can] += 1
  stride_total = 2 ** pools
  patch = (np.ceil(patch / stride_total) * stride_total).astype(int)
  stages = int(pools.max()) + 1
  strides = [[1] * len(patch)] + [[2 if pools[a] >= s else 1 for a in range(len(patch))]
                                   for s in range(1, stages)]
  channels = fp["channels"]
  plan = {
      "dims": dims,
      "target_spacing": target.tolist(),
      "patch_size": patch.tolist(),
      "slice_axis": slice_axis,
      "strides": strides,
      "features": [min(base_features * 2**s, _MAX_FEATURES) for s in range(stages)],
      "normalization": ["ct" if c.upper() == "CT" else "zscore" for c in channels],
      "foreground_intensity": fp["foreground_intensity"],
      "num_classes": len(fp["class_names"]),
      "class_names": fp["class_names"],
  }
  for key, value in (overrides or {}).items():
    if key not in plan:
      raise KeyError(f"plan override {key!r} is not a plan key ({sorted(plan)})")
    plan[key] = value
  return plan


def plan_hash(plan: dict[str, Any]) -> str:
  """Identifies what the cache depends on (spacing and normalisation, not the network)."""
  keys = ("target_spacing", "normalization", "foreground_intensity")
  text = json.dumps({k: plan[k] for k in keys}, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def _nonzero_box(array: np.ndarray) -> tuple[slice, ...]:
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
  the crop box and shapes that `restore_geometry` needs to undo the steps.
  """
  box = _nonzero_box(image.array)
  record = {"image": _normalize(image.array[box], plan), "spacing": image.spacing.copy()}
  if label is not None:
    record["label"] = np.ascontiguousarray(label.array[box], np.uint8)
  resampled = transforms.Resample(spacing=tuple(plan["target_spacing"])).map(record)
  props = {"canonical_shape": list(image.shape), "box": [[s.start, s.stop] for s in box],
           "cropped_shape": [s.stop - s.start for s in box],
           "spacing": image.spacing.tolist(), "canonical_affine": image.affine.tolist(),
           "preprocessed_shape": list(resampled["image"].shape[:3]),
           "preprocessed_spacing": np.asarray(resampled["spacing"]).tolist()}
  return (np.ascontiguousarray(resampled["image"], np.float32),
          resampled.get("label"), props)


def restore_geometry(probabilities: np.ndarray, props: dict[str, Any]) -> np.ndarray:
  """Preprocessed-grid class probabilities ``[*spatial, K]`` → the canonical image's grid.

  Undoes the resampling (linear, on probabilities, so the argmax stays smooth) and the crop
  (background outside the box).
  """
  cropped = props["cropped_shape"]
  record = {"image": probabilities.astype(np.float32),
            "spacing": np.asarray(props["preprocessed_spacing"])}
  if list(probabilities.shape[:3]) != cropped:
    zoom = np.asarray(props["preprocessed_spacing"]) * np.asarray(probabilities.shape[:3])
    record = transforms.Resample(spacing=tuple(zoom / np.asarray(cropped))).map(record)
  restored = record["image"]
  if list(restored.shape[:3]) != cropped:  # rounding: crop/pad the last voxel
    restored = transforms.CropOrPad(shape=tuple(cropped), mode="edge").map(
        {"image": restored})["image"]
  out = np.zeros(tuple(props["canonical_shape"]) + (probabilities.shape[-1],), np.float32)
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
            _locations(seg, dataset.num_classes,
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


def make_folds(case_ids: Sequence[str], path: str, folds: int = 5, seed: int = 12345
               ) -> list[dict[str, list[str]]]:
  """The k-fold split (nnU-Net's: sorted ids, shuffled KFold with seed 12345), written once.

  An existing file is reused as it is, so every later run and fold sees the same split; it must
  cover exactly ``case_ids``.
  """
  ids = sorted(case_ids)
  if os.path.exists(path):
    with open(path) as f:
      splits = json.load(f)
    covered = sorted(i for s in splits for i in s["val"])
    if covered != ids:
      raise MedjaxIOError(path, "the split file does not cover this dataset's cases; delete it "
                          "to make a new one")
    return splits
  kfold = KFold(n_splits=folds, shuffle=True, random_state=seed)
  splits = [{"train": [ids[i] for i in tr], "val": [ids[i] for i in va]}
            for tr, va in kfold.split(ids)]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _save(path, splits)
  return splits


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


class CaseSource:
  """Grain random-access source over cached cases: ``{"image", "label", "locations", "index"}``.

  Whole cases, for the ``patch`` transform to cut; ``locations`` are (class, i, j, k) rows.
  """

  def __init__(self, folder: str, case_ids: Sequence[str], locations: bool = True):
    self.folder = folder
    self.case_ids = list(case_ids)
    self.cases = [load_cached(folder, c) for c in self.case_ids]
    self.locations = locations  # off for evaluation: batching needs equal-shaped fields

  def __getstate__(self):
    # Grain's worker processes get the cache's paths and map the files themselves; pickling the
    # memory maps would copy every case into each worker.
    return {"folder": self.folder, "case_ids": self.case_ids, "locations": self.locations}

  def __setstate__(self, state):
    self.__init__(**state)

  def __len__(self) -> int:
    return len(self.cases)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    case = self.cases[index]
    record = {"image": np.asarray(case.image), "label": np.asarray(case.label),
              "index": np.int64(index)}
    if self.locations:
      record["locations"] = case.locations
    return record

  def __repr__(self) -> str:
    return f"CaseSource({self.folder}, n={len(self)})"


class SliceSource:
  """Every slice along ``axis`` of cached cases, as 2-D records ``{"image", "label", "index"}``
  (``index`` numbers the slices in order, case by case)."""

  def __init__(self, folder: str, case_ids: Sequence[str], axis: int):
    self.folder, self.case_ids = folder, list(case_ids)
    self.cases = [load_cached(folder, c) for c in self.case_ids]
    self.axis = axis
    self.slices = [(n, k) for n, c in enumerate(self.cases) for k in range(c.image.shape[axis])]

  def __getstate__(self):  # as CaseSource: paths, not memory maps
    return {"folder": self.folder, "case_ids": self.case_ids, "axis": self.axis}

  def __setstate__(self, state):
    self.__init__(**state)

  def __len__(self) -> int:
    return len(self.slices)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n, k = self.slices[index]
    case = self.cases[n]
    return {"image": np.take(case.image, k, axis=self.axis),
            "label": np.take(case.label, k, axis=self.axis), "index": np.int64(index)}


@registry.register("transforms.patch")
@dataclasses.dataclass(frozen=True)
class RandomPatch(grain.transforms.RandomMap):
  """Cuts a training patch from a whole case, a share of them centred on foreground.

  With probability ``foreground`` the patch is centred on a random voxel of a random class that
  the case contains (from ``record["locations"]``), else placed uniformly; where the patch leaves
  the volume, the image is padded with 0 (the normalised mean) and the label with background.
  Like nnU-Net's data loader, placement may extend past the volume by up to half the patch's
  excess on each side. ``squeeze`` drops a size-1 spatial axis (2-D training on slices).
  nnU-Net: ``nnUNetDataLoader`` with ``oversample_foreground_percent=0.33``; MONAI:
  ``RandCropByPosNegLabel``; TorchIO: ``LabelSampler``.
  """

  shape: Sequence[int] = (40, 56, 40)
  foreground: float = 0.33
  squeeze: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
    if not 0.0 <= self.foreground <= 1.0:
      raise ValueError(f"patch: foreground={self.foreground} is not in [0, 1]")
    if self.squeeze is not None and self.shape[self.squeeze] != 1:
      raise ValueError(f"patch: squeeze axis {self.squeeze} has size {self.shape[self.squeeze]}")

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, label = record["image"], record["label"]
    shape = np.array(image.shape[:-1])
    patch = np.array(self.shape)
    if len(patch) != len(shape):
      raise ValueError(f"patch: shape {self.shape} for a {len(shape)}-D image")
    excess = np.maximum(patch - shape, 0)
    low = -(excess // 2)
    high = shape + excess // 2 + excess % 2 - patch
    locations = record.get("locations")
    if locations is not None and len(locations) and rng.random() < self.foreground:
      classes = np.unique(locations[:, 0])
      chosen = locations[locations[:, 0] == rng.choice(classes)]
      centre = chosen[rng.integers(len(chosen)), 1:]
      start = np.clip(centre - patch // 2, low, high)
    else:
      start = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
    out = {k: v for k, v in record.items() if k not in ("locations", "image", "label")}
    out["image"] = _cut(image, start, patch, 0.0)
    out["label"] = _cut(label, start, patch, 0)
    if self.squeeze is not None:
      out["image"] = np.squeeze(out["image"], self.squeeze)
      out["label"] = np.squeeze(out["label"], self.squeeze)
      if "spacing" in out:
        out["spacing"] = np.delete(np.asarray(out["spacing"]), self.squeeze)
    return out


def _cut(array: np.ndarray, start: np.ndarray, size: np.ndarray, fill) -> np.ndarray:
  """``array[start:start+size]`` over the spatial axes, padded with ``fill`` outside."""
  out = np.full(tuple(size) + array.shape[len(size):], fill, array.dtype)
  src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, array.shape))
  dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
  out[dst] = array[src]
  return out
