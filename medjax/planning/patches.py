"""Training and evaluation sources over cached cases, and the ``patch`` transform.

`CaseSource` reads whole cached cases, `SliceSource` their slices (2-D plans); the ``patch``
transform samples training patches with foreground oversampling, padding where a patch leaves
the volume.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from medjax import registry
from medjax.planning.preprocessing import load_cached


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
