"""Grain random-access data sources: index → ``{"image", "label", "index"}`` records."""

from __future__ import annotations

import os

import numpy as np

from medjax.data.fusion import luminance
from medjax.io import harvard
from medjax.io.errors import MedjaxIOError
from medjax.io.medmnist import MedMNISTSplit, load_medmnist
from medjax.io.volume import Volume, grid_mismatch


class ArraySource:
  """A ``grain.RandomAccessDataSource`` over in-memory image and label arrays.

  Records are ``{"image": [*spatial, C] (source dtype), "label": int64 or [K] int64,
  "index": int64}``; ``index`` is the position in the split, kept so predictions can be traced
  back to their case.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
    if len(images) != len(labels):
      raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = labels
    self.name = name

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index],
            "index": np.int64(index)}

  def __repr__(self) -> str:
    return f"ArraySource({self.name}, n={len(self)}, image={self.images.shape[1:]})"


def medmnist_source(flag: str, split: str, *, size: int = 28, data_dir: str | None = None,
                    download: bool = False) -> tuple[ArraySource, MedMNISTSplit]:
  """Loads one MedMNIST split as an ``ArraySource`` (and returns the split's metadata too)."""
  data = load_medmnist(flag, split, size=size, data_dir=data_dir, download=download)
  return ArraySource(data.images, data.labels, name=f"{flag}_{size}:{split}"), data


def harvard_source(root: str, pair: str, split: str) -> ArraySource:
  """One split of a Harvard atlas pair folder (`medjax.io.harvard`) for a fusion model.

  Splits: ``test`` (`harvard.split_of`'s held-out cases), ``val`` (`harvard.validation_cases`,
  carved from the other cases) and ``train`` (the rest). Records: ``image`` float32 ``[H, W, 2]``,
  the MRI and the other source's grey levels (a colour source's luminance, BT.601 Y, as the
  classical methods fuse it) over 255; ``label`` the same rounded to uint8 0..255, what the
  fusion metrics score against. Both are on the image grid, so geometric transforms move both.

  Raises:
    MedjaxIOError: the folder is unreadable or the split holds no pair.
  """
  if split not in ("train", "val", "test"):
    raise ValueError(f"Harvard atlas split must be train, val or test, not {split!r}")
  pairs = harvard.read_pairs(root, pair, "test" if split == "test" else "train")
  if split != "test":
    val = set(harvard.validation_cases(root, [pair])[pair])
    pairs = [p for p in pairs if (p.case in val) == (split == "val")]
  if not pairs:
    raise MedjaxIOError(os.path.join(root, pair), f"no pairs on the {split} split")
  grey = np.stack([np.stack([luminance(p.a), luminance(p.b)], axis=-1) for p in pairs])
  return ArraySource((grey / 255.0).astype(np.float32),
                     np.clip(np.round(grey), 0, 255).astype(np.uint8), name=f"{pair}:{split}")


def volume_record(image: Volume, label: Volume | None = None,
                  label_path: str | os.PathLike = "label") -> dict[str, np.ndarray]:
  """A transform-ready record ``{"image", "spacing"[, "label"]}`` from a Volume (and its labels).

  The label map must lie on the image's grid (`grid_mismatch`); otherwise `MedjaxIOError` names
  ``label_path``, because a shifted mask trains a wrong model without any other symptom.
  """
  record = {"image": image.array, "spacing": image.spacing.copy()}
  if label is not None:
    problem = grid_mismatch(image, label)
    if problem:
      raise MedjaxIOError(label_path, f"label map not on the image's grid: {problem}")
    record["label"] = label.array
  return record
