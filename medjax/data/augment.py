"""Random augmentations (``grain.transforms.RandomMap``), registered as ``transforms.<name>``:
flips, 90° rotations, affine and elastic warps, intensity, gamma, noise, blur and contrast.

Their randomness comes only from the generator Grain passes in; the record convention is
`medjax.data.transforms`'.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np
from scipy import ndimage

from medjax import registry
from medjax.data.spatial import (
    Range,
    Record,
    _about_centre,
    _as_range,
    _check_p,
    _float_image,
    _map_spatial,
    _random_rotation,
    _require,
    _sample_around_one,
    _spatial_ndim,
    _warp,
)


@registry.register("transforms.flip")
@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Flips each listed spatial axis independently with probability ``p`` (label too).

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
    if not flip:
      return {**record, "image": np.ascontiguousarray(image)}
    return _map_spatial(record, lambda x: np.flip(x, axis=tuple(a % nd for a in flip)))


@registry.register("transforms.rot90")
@dataclasses.dataclass(frozen=True)
class RandomRot90(grain.transforms.RandomMap):
  """With probability ``p``, rotates by 90, 180 or 270 degrees (uniformly) in the ``axes`` plane.

  Exact (no interpolation); the label turns with the image. A quarter turn of a non-square plane
  swaps the two sizes, and the two ``record["spacing"]`` entries with them.
  MONAI: ``RandRotate90(spatial_axes=axes)``; nnU-Net: rotation by multiples of 90 (2-D planes).
  """

  axes: tuple[int, int] = (0, 1)
  p: float = 0.5

  def __post_init__(self):
    object.__setattr__(self, "axes", tuple(self.axes))
    _require(len(self.axes) == 2 and self.axes[0] != self.axes[1], "rot90",
             f"axes must be two different spatial axes, got {self.axes}")
    _check_p("rot90", self.p)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    nd = _spatial_ndim(record["image"])
    _require(all(-nd <= a < nd for a in self.axes) and self.axes[0] % nd != self.axes[1] % nd,
             "rot90", f"axes {self.axes} do not name a plane of the {nd}-D image")
    if rng.random() >= self.p:
      return record
    k = int(rng.integers(1, 4))
    axes = tuple(a % nd for a in self.axes)
    out = _map_spatial(record, lambda x: np.rot90(x, k, axes))
    if k % 2 and "spacing" in record:
      spacing = np.array(record["spacing"], dtype=np.float64)
      spacing[list(axes)] = spacing[list(axes[::-1])]
      out["spacing"] = spacing
    return out


@registry.register("transforms.affine")
@dataclasses.dataclass(frozen=True)
class RandomAffine(grain.transforms.RandomMap):
  """Small random rotation (degrees, each plane), isotropic scale and translation about the centre.

  Linear interpolation, edges padded with the nearest value; a spatial label is warped the same
  way with nearest neighbour and background (0) outside. Applied with probability ``p``.
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
    if rng.random() >= self.p:
      return _float_image(record)
    nd = _spatial_ndim(record["image"])
    matrix = _random_rotation(nd, rng, self.rotate)
    matrix = matrix / rng.uniform(1 - self.scale, 1 + self.scale)
    shift = rng.uniform(-self.translate, self.translate, size=nd) * np.array(
        record["image"].shape[:nd])
    return _about_centre(record, matrix, shift)


@registry.register("transforms.rotate")
@dataclasses.dataclass(frozen=True)
class RandomRotate(grain.transforms.RandomMap):
  """Random rotation about the centre, uniform in ``[-degrees, degrees]`` in each plane.

  One plane in 2-D, the three planes in 3-D; interpolation and edges as ``affine``.
  MONAI: ``RandRotate``; TorchIO: ``RandomAffine(degrees=..., scales=0)``; nnU-Net: the rotation
  of its spatial transform.
  """

  degrees: float = 15.0
  p: float = 1.0

  def __post_init__(self):
    _require(self.degrees >= 0, "rotate", f"degrees must be >= 0, got {self.degrees}")
    _check_p("rotate", self.p)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return _float_image(record)
    return _about_centre(record, _random_rotation(_spatial_ndim(record["image"]), rng,
                                                  self.degrees))


@registry.register("transforms.elastic")
@dataclasses.dataclass(frozen=True)
class RandomElastic(grain.transforms.RandomMap):
  """nnU-Net-style elastic deformation, applied with probability ``p``.

  Per spatial axis a displacement field of uniform [-1, 1] noise is smoothed by a Gaussian of
  ``sigma`` voxels and scaled by ``alpha`` (both drawn per record from their ranges); the image
  is resampled linearly and the label by nearest neighbour, edges as ``affine``.
  nnU-Net: ``elastic_deform_coordinates`` (batchgenerators); MONAI: ``Rand2DElastic`` /
  ``Rand3DElastic``; TorchIO: ``RandomElasticDeformation`` (B-spline control grid instead).
  """

  alpha: Range = (0.0, 200.0)
  sigma: Range = (9.0, 13.0)
  p: float = 0.2

  def __post_init__(self):
    object.__setattr__(self, "alpha", _as_range("elastic", "alpha", self.alpha, 0.0))
    object.__setattr__(self, "sigma", _as_range("elastic", "sigma", self.sigma, 0.0))
    _check_p("elastic", self.p)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return _float_image(record)
    shape = record["image"].shape[:-1]
    alpha, sigma = rng.uniform(*self.alpha), rng.uniform(*self.sigma)
    coords = np.indices(shape, dtype=np.float64)
    for d in range(len(shape)):
      noise = rng.uniform(-1.0, 1.0, size=shape)
      coords[d] += ndimage.gaussian_filter(noise, sigma, mode="constant") * alpha
    return _warp(record, lambda x, order, mode: ndimage.map_coordinates(
        x, coords, order=order, mode=mode, cval=0.0))


# --- Intensity augmentation (random) ----------------------------------------------------------


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


@registry.register("transforms.gamma")
@dataclasses.dataclass(frozen=True)
class RandomGamma(grain.transforms.RandomMap):
  """nnU-Net gamma: each channel rescaled to [0, 1], raised to ``gamma``, mapped back.

  The channel's min and max are kept. Gamma is drawn per record, half the time below 1 and half
  above (nnU-Net's rule). ``invert`` applies it to the negated image (brightens bright regions).
  nnU-Net: ``GammaTransform`` / ``augment_gamma``; MONAI: ``RandAdjustContrast``; TorchIO:
  ``RandomGamma`` (which does not rescale).
  """

  gamma: Range = (0.7, 1.5)
  p: float = 0.3
  invert: bool = False

  def __post_init__(self):
    object.__setattr__(self, "gamma", _as_range("gamma", "gamma", self.gamma, 1e-6))
    _check_p("gamma", self.p)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return _float_image(record)
    g = _sample_around_one(rng, *self.gamma)
    sign = -1.0 if self.invert else 1.0
    image = sign * record["image"].astype(np.float64)
    lo = image.min(axis=tuple(range(image.ndim - 1)))
    span = image.max(axis=tuple(range(image.ndim - 1))) - lo
    safe = np.where(span > 0, span, 1.0)  # a flat channel maps to itself
    image = ((image - lo) / safe) ** g * safe + lo
    return {**record, "image": np.ascontiguousarray(sign * image, dtype=np.float32)}


@registry.register("transforms.noise")
@dataclasses.dataclass(frozen=True)
class RandomNoise(grain.transforms.RandomMap):
  """Adds zero-mean Gaussian noise whose std is drawn per record from ``std``.

  MONAI: ``RandGaussianNoise``; nnU-Net: ``GaussianNoiseTransform``; TorchIO: ``RandomNoise``.
  """

  std: Range = (0.0, 0.1)
  p: float = 0.15

  def __post_init__(self):
    object.__setattr__(self, "std", _as_range("noise", "std", self.std, 0.0))
    _check_p("noise", self.p)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return _float_image(record)
    std = np.float32(rng.uniform(*self.std))
    image = record["image"].astype(np.float32)
    return {**record, "image": image + std * rng.standard_normal(image.shape, dtype=np.float32)}


@registry.register("transforms.blur")
@dataclasses.dataclass(frozen=True)
class RandomBlur(grain.transforms.RandomMap):
  """Gaussian blur over the spatial axes (never across channels), sigma in voxels per record.

  MONAI: ``RandGaussianSmooth``; nnU-Net: ``GaussianBlurTransform``; TorchIO: ``RandomBlur``.
  """

  sigma: Range = (0.5, 1.0)
  p: float = 0.2

  def __post_init__(self):
    object.__setattr__(self, "sigma", _as_range("blur", "sigma", self.sigma, 0.0))
    _check_p("blur", self.p)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return _float_image(record)
    image = record["image"].astype(np.float32)
    sigma = (rng.uniform(*self.sigma),) * _spatial_ndim(image) + (0.0,)
    return {**record, "image": ndimage.gaussian_filter(image, sigma, mode="nearest")}


@registry.register("transforms.contrast")
@dataclasses.dataclass(frozen=True)
class RandomContrast(grain.transforms.RandomMap):
  """nnU-Net contrast: each channel scaled by ``factor`` about its mean, then clipped to its range.

  The factor is drawn per record, half the time below 1 and half above (nnU-Net's rule).
  nnU-Net: ``ContrastAugmentationTransform(preserve_range=True)``; MONAI:
  ``RandScaleIntensityFixedMean``; TorchIO has no direct equivalent.
  """

  factor: Range = (0.75, 1.25)
  p: float = 0.15

  def __post_init__(self):
    object.__setattr__(self, "factor", _as_range("contrast", "factor", self.factor, 0.0))
    _check_p("contrast", self.p)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.random() >= self.p:
      return _float_image(record)
    f = _sample_around_one(rng, *self.factor)
    image = record["image"].astype(np.float64)
    axes = tuple(range(image.ndim - 1))
    mean = image.mean(axis=axes)
    image = np.clip((image - mean) * f + mean, image.min(axis=axes), image.max(axis=axes))
    return {**record, "image": np.ascontiguousarray(image, dtype=np.float32)}
