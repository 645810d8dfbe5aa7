"""Grain transforms on dict records (``{"image": [*spatial, C], "label": ...}``), 2-D and 3-D.

Each op is registered as ``transforms.<name>`` so a config can write a pipeline as a string,
``"to_float|flip(axes=(0, 1))|affine(rotate=10)|normalize(0.5, 0.5)"`` (big_vision style).
Random ops are ``grain.transforms.RandomMap``: their randomness comes only from the generator
Grain passes in, seeded per record, so the same seed gives the same augmented stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np
from scipy import ndimage

from medjax import registry

Record = dict[str, Any]


def _spatial_ndim(image: np.ndarray) -> int:
  return image.ndim - 1  # channels-last


@registry.register("transforms.to_float")
@dataclasses.dataclass(frozen=True)
class ToFloat(grain.transforms.Map):
  """Casts the image to float32, multiplied by ``scale`` (1/255 maps uint8 to [0, 1]).

  MONAI: ``ScaleIntensityRange(0, 255, 0, 1)``; torchvision: ``ToTensor``.
  """

  scale: float = 1.0 / 255.0

  def map(self, record: Record) -> Record:
    return {**record, "image": record["image"].astype(np.float32) * np.float32(self.scale)}


@registry.register("transforms.normalize")
@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """``(image - mean) / std`` with fixed statistics. MONAI: ``NormalizeIntensity(subtrahend, divisor)``."""

  mean: float = 0.5
  std: float = 0.5

  def map(self, record: Record) -> Record:
    image = (record["image"] - np.float32(self.mean)) / np.float32(self.std)
    return {**record, "image": image.astype(np.float32)}


@registry.register("transforms.flip")
@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Flips each listed spatial axis independently with probability ``p``.

  Axes index the spatial dims (0 = first spatial axis: H for 2-D, D for 3-D).
  MONAI: ``RandFlip``; nnU-Net: mirroring; TorchIO: ``RandomFlip``.
  """

  axes: Sequence[int] = (1,)
  p: float = 0.5

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    image = record["image"]
    nd = _spatial_ndim(image)
    flip = [a for a in self.axes if rng.random() < self.p]
    for a in flip:
      if not -nd <= a < nd:
        raise ValueError(f"flip axis {a} out of range for a {nd}-D image")
    if flip:
      image = np.flip(image, axis=tuple(a % nd for a in flip))
    return {**record, "image": np.ascontiguousarray(image)}


@registry.register("transforms.affine")
@dataclasses.dataclass(frozen=True)
class RandomAffine(grain.transforms.RandomMap):
  """Small random rotation (degrees, each plane), isotropic scale and translation about the centre.

  Linear interpolation, edges padded with the nearest value. Applied with probability ``p``.
  MONAI: ``RandAffine``; TorchIO: ``RandomAffine``; nnU-Net: its spatial transform (no elastic).

  Attributes:
    rotate: max absolute rotation in degrees, in each of the image's rotation planes.
    scale: max relative zoom, sampled in ``[1 - scale, 1 + scale]``.
    translate: max shift as a fraction of each spatial size.
    p: probability of applying the transform to a record.
  """

  rotate: float = 10.0
  scale: float = 0.1
  translate: float = 0.05
  p: float = 1.0

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    image = record["image"]
    if rng.random() >= self.p:
      return record
    nd = _spatial_ndim(image)
    shape = np.array(image.shape[:nd], dtype=np.float64)
    matrix = np.eye(nd)
    planes = [(0, 1)] if nd == 2 else [(0, 1), (0, 2), (1, 2)]
    for a, b in planes:
      theta = np.deg2rad(rng.uniform(-self.rotate, self.rotate))
      r = np.eye(nd)
      r[a, a] = r[b, b] = np.cos(theta)
      r[a, b], r[b, a] = -np.sin(theta), np.sin(theta)
      matrix = matrix @ r
    matrix = matrix / rng.uniform(1 - self.scale, 1 + self.scale)
    shift = rng.uniform(-self.translate, self.translate, size=nd) * shape
    centre = (shape - 1) / 2
    offset = centre - matrix @ centre - shift
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[-1]):
      out[..., c] = ndimage.affine_transform(
          image[..., c].astype(np.float32), matrix, offset, order=1, mode="nearest")
    return {**record, "image": out}


@registry.register("transforms.intensity")
@dataclasses.dataclass(frozen=True)
class RandomIntensity(grain.transforms.RandomMap):
  """Random brightness shift and contrast factor (``x * c + b``) on a float image.

  MONAI: ``RandShiftIntensity`` + ``RandScaleIntensity``; nnU-Net: brightness/contrast.
  """

  brightness: float = 0.1
  contrast: float = 0.1
  p: float = 0.5

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return record
    c = rng.uniform(1 - self.contrast, 1 + self.contrast)
    b = rng.uniform(-self.brightness, self.brightness)
    return {**record, "image": (record["image"] * c + b).astype(np.float32)}


def parse(spec: str) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """Builds the transforms of a ``"op1(...)|op2|..."`` spec (empty spec: no transforms)."""
  return [registry.lookup(op, "transforms.")() for op in spec.split("|") if op.strip()]
