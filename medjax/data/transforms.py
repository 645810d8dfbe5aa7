"""Grain transforms on dict records: the preprocessing and augmentation chain, 2-D and 3-D.

Each op is registered as ``transforms.<name>`` so a config can write a pipeline as a string,
``"window(preset='lung')|resample(spacing=(1., 1., 1.))|crop_or_pad(shape=(96, 96, 64))|flip"``
(big_vision style); the deterministic ops are here, the random ones in ``augment.py`` (importable
here too). Random ops are ``grain.transforms.RandomMap``: their randomness comes only
from the generator Grain passes in, seeded per record, so the same seed gives the same stream.

Record convention:

* ``record["image"]``: channels-last array ``[*spatial, C]``, 2-D or 3-D spatial.
* ``record["label"]`` (optional): a segmentation map when ``label.shape[:-1] ==
  image.shape[:-1]`` (normally an integer ``[*spatial, 1]``); every spatial op then applies the
  same geometric change to it, with nearest-neighbour sampling and its dtype kept. A label of
  any other shape (a class index, a multi-label vector) is passed through untouched.
* ``record["spacing"]`` (optional): float array of the voxel sizes in mm, one per spatial axis in
  the same order. ``resample`` needs it and updates it; ``rot90`` swaps its entries with the axes.

Geometric ops work in voxel space: rotations do not account for anisotropic spacing, so resample
to an isotropic grid first when that matters. Images leave intensity and warping ops as float32;
``clip``, ``flip``, ``rot90``, ``crop_foreground`` and ``crop_or_pad`` keep the image dtype.
All arrays returned are C-contiguous. Bad arguments raise ``ValueError`` naming the op, at
construction when the arguments alone show the problem, else when the record shows it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from medjax import registry
from medjax.data.augment import (  # noqa: F401  (registered; importable here)
    RandomAffine,
    RandomBlur,
    RandomContrast,
    RandomElastic,
    RandomFlip,
    RandomGamma,
    RandomIntensity,
    RandomNoise,
    RandomRot90,
    RandomRotate,
)
from medjax.data.spatial import (
    Record,
    _affine_sampler,
    _float_image,
    _map_spatial,
    _require,
    _separate_z_sampler,
    _spatial_label,
    _spatial_ndim,
    _warp,
)

# --- Intensity preprocessing (deterministic) --------------------------------------------------

# CT display windows as (level, width) in HU, the usual radiology reading settings.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}


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
  """``(image - mean) / std`` with fixed statistics.

  MONAI: ``NormalizeIntensity(subtrahend, divisor)``; torchvision: ``Normalize``.
  """

  mean: float = 0.5
  std: float = 0.5

  def map(self, record: Record) -> Record:
    image = (record["image"] - np.float32(self.mean)) / np.float32(self.std)
    return {**record, "image": image.astype(np.float32)}


@registry.register("transforms.window")
@dataclasses.dataclass(frozen=True)
class Window(grain.transforms.Map):
  """CT windowing: clips to ``[level - width/2, level + width/2]`` and maps that onto ``out_range``.

  MONAI: ``ScaleIntensityRange(a_min, a_max, b_min, b_max, clip=True)``; TorchIO:
  ``Clamp`` + ``RescaleIntensity(in_min_max=...)``. nnU-Net instead clips at dataset percentiles.

  Attributes:
    level: window centre in HU; give it with ``width``, or give ``preset``.
    width: window width in HU (> 0).
    preset: a name in ``WINDOW_PRESETS`` (lung, mediastinum, soft_tissue, bone, brain, liver).
    out_range: values the window's low and high ends map to.
  """

  level: float | None = None
  width: float | None = None
  preset: str | None = None
  out_range: tuple[float, float] = (0.0, 1.0)

  def __post_init__(self):
    if self.preset is not None:
      _require(self.level is None and self.width is None, "window",
               "give either preset or level and width, not both")
      _require(self.preset in WINDOW_PRESETS, "window",
               f"unknown preset {self.preset!r}; known: {sorted(WINDOW_PRESETS)}")
    else:
      _require(self.level is not None and self.width is not None, "window",
               "give preset, or both level and width")
      _require(self.width > 0, "window", f"width must be > 0, got {self.width}")
    _require(len(self.out_range) == 2, "window", f"out_range must be (low, high), got "
             f"{self.out_range}")

  @property
  def bounds(self) -> tuple[float, float]:
    """The HU interval that the window maps onto ``out_range``."""
    level, width = WINDOW_PRESETS[self.preset] if self.preset else (self.level, self.width)
    return level - width / 2, level + width / 2

  def map(self, record: Record) -> Record:
    lo, hi = self.bounds
    a, b = self.out_range
    image = (np.clip(record["image"], lo, hi) - lo) * ((b - a) / (hi - lo)) + a
    return {**record, "image": np.ascontiguousarray(image, dtype=np.float32)}


@registry.register("transforms.clip")
@dataclasses.dataclass(frozen=True)
class Clip(grain.transforms.Map):
  """Clips intensities to ``[low, high]`` (e.g. HU) without rescaling; integer images stay integer.

  MONAI: ``ThresholdIntensity`` twice / ``ScaleIntensityRange`` without the rescale; TorchIO:
  ``Clamp``; nnU-Net: the clipping step of its CT normalisation.
  """

  low: float = -1024.0
  high: float = 3071.0

  def __post_init__(self):
    _require(self.low < self.high, "clip", f"low={self.low} must be < high={self.high}")

  def map(self, record: Record) -> Record:
    image = record["image"]
    lo, hi = self.low, self.high
    if np.issubdtype(image.dtype, np.integer):
      # Integer bounds inside the dtype's range keep the result exact and the dtype unchanged.
      info = np.iinfo(image.dtype)
      lo = image.dtype.type(np.clip(np.ceil(lo), info.min, info.max))
      hi = image.dtype.type(np.clip(np.floor(hi), info.min, info.max))
    return {**record, "image": np.ascontiguousarray(np.clip(image, lo, hi))}


@registry.register("transforms.zscore")
@dataclasses.dataclass(frozen=True)
class ZScore(grain.transforms.Map):
  """Per-image z-score, ``(x - mean) / max(std, eps)``, optionally with foreground statistics.

  With ``nonzero`` the statistics come from the nonzero voxels, with ``mask_key`` from the voxels
  where ``record[mask_key]`` is true; either way voxels outside that mask become 0 (nnU-Net's
  ``use_mask_for_norm``). A constant image, or an empty mask, gives zeros.
  MONAI: ``NormalizeIntensity(nonzero=..., channel_wise=per_channel)``; nnU-Net:
  ``ZScoreNormalization``; TorchIO: ``ZNormalization(masking_method=...)``.

  Attributes:
    nonzero: statistics over nonzero voxels only (per channel when ``per_channel``).
    mask_key: record key of a boolean mask ``[*spatial]``, ``[*spatial, 1]`` or ``[*spatial, C]``.
    eps: floor of the std, so a flat image does not divide by zero.
    per_channel: one mean/std per channel, else one over all channels.
  """

  nonzero: bool = False
  mask_key: str | None = None
  eps: float = 1e-8
  per_channel: bool = True

  def __post_init__(self):
    _require(not (self.nonzero and self.mask_key), "zscore",
             "nonzero and mask_key are alternatives; give one")
    _require(self.eps > 0, "zscore", f"eps must be > 0, got {self.eps}")

  def _mask(self, record: Record) -> np.ndarray | None:
    image = record["image"]
    if self.nonzero:
      return image != 0
    if self.mask_key is None:
      return None
    _require(self.mask_key in record, "zscore", f"record has no mask {self.mask_key!r}")
    mask = np.asarray(record[self.mask_key]).astype(bool)
    if mask.ndim == _spatial_ndim(image):
      mask = mask[..., None]
    _require(mask.shape[:-1] == image.shape[:-1] and mask.shape[-1] in (1, image.shape[-1]),
             "zscore", f"mask shape {mask.shape} does not fit image shape {image.shape}")
    return np.broadcast_to(mask, image.shape)

  def map(self, record: Record) -> Record:
    image = record["image"].astype(np.float64)
    mask = self._mask(record)
    groups = [np.s_[..., c:c + 1] for c in range(image.shape[-1])] if self.per_channel else [
        np.s_[...]]
    out = np.zeros(image.shape, np.float32)
    for g in groups:
      x = image[g]
      m = np.ones(x.shape, bool) if mask is None else mask[g]
      if m.any():
        values = x[m]
        out[g] = np.where(m, (x - values.mean()) / max(values.std(), self.eps), 0.0)
    return {**record, "image": out}


@registry.register("transforms.percentile_clip")
@dataclasses.dataclass(frozen=True)
class PercentileClip(grain.transforms.Map):
  """Clips each channel to its own ``[lower, upper]`` percentiles, optionally rescaled to [0, 1].

  MONAI: ``ScaleIntensityRangePercentiles(lower, upper, 0, 1, clip=True)`` (with ``rescale``);
  nnU-Net: the 0.5/99.5 percentile clip of its CT scheme, here per image instead of per dataset.
  TorchIO: ``RescaleIntensity(percentiles=...)``.
  """

  lower: float = 0.5
  upper: float = 99.5
  rescale: bool = False

  def __post_init__(self):
    _require(0 <= self.lower < self.upper <= 100, "percentile_clip",
             f"need 0 <= lower < upper <= 100, got lower={self.lower}, upper={self.upper}")

  def map(self, record: Record) -> Record:
    image = record["image"]
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[-1]):
      x = image[..., c].astype(np.float64)
      lo, hi = np.percentile(x, [self.lower, self.upper])
      x = np.clip(x, lo, hi)
      if self.rescale:
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
      out[..., c] = x
    return {**record, "image": out}


@registry.register("transforms.greyscale")
@dataclasses.dataclass(frozen=True)
class Greyscale(grain.transforms.Map):
  """RGB (C=3) to one channel with ITU-R BT.601 luma weights; C=1 passes through (as float32).

  torchvision: ``Grayscale``; MONAI has no direct equivalent (``Lambda`` in practice).
  """

  weights: tuple[float, float, float] = (0.299, 0.587, 0.114)

  def __post_init__(self):
    _require(len(self.weights) == 3, "greyscale", f"needs 3 weights, got {self.weights}")

  def map(self, record: Record) -> Record:
    image = record["image"]
    c = image.shape[-1]
    _require(c in (1, 3), "greyscale", f"expects 1 or 3 channels, got {c}")
    if c == 3:
      image = (image.astype(np.float32) @ np.asarray(self.weights, np.float32))[..., None]
    return {**record, "image": np.ascontiguousarray(image, dtype=np.float32)}


# --- Grid changes (deterministic) -------------------------------------------------------------


@registry.register("transforms.resample")
@dataclasses.dataclass(frozen=True)
class Resample(grain.transforms.Map):
  """Resamples image and label to a target voxel spacing, using ``record["spacing"]``.

  The output has ``max(1, round(n * old / new))`` voxels per axis, so it covers the input's
  extent; ``record["spacing"]`` becomes the effective spacing ``old * n_old / n_new`` (equal to
  the target up to rounding). The first voxel centre stays in place (the world origin is
  unchanged) and output voxel ``i`` samples input coordinate ``i * n_old / n_new``; when
  upsampling the last few samples fall up to one input voxel past the last centre and take the
  edge value. There is no anti-aliasing (nnU-Net has none either). Labels use nearest neighbour
  (``label_order=0``) or, for ``label_order > 0``, nnU-Net's per-class interpolation; either way
  the label keeps its dtype and only holds values it had before.
  MONAI: ``Spacing``; nnU-Net: its resampling to the target spacing; TorchIO: ``Resample``.

  Attributes:
    spacing: target spacing in mm, one entry per spatial axis of the image.
    order: spline order for the image (1 = linear, 3 = cubic as nnU-Net uses for images).
    label_order: 0 = nearest neighbour; > 0 = per-class interpolation with that order.
    z_axis: an axis resampled on its own (nnU-Net's separate z for anisotropic data, the rule
      being `medjax.data.spatial.separate_z_axis`): the other axes slice by slice with
      ``order`` / ``label_order``, then this one with ``order_z`` for image and label alike.
    order_z: spline order along ``z_axis`` (nnU-Net: 0, nearest).
  """

  spacing: Sequence[float] = (1.0, 1.0, 1.0)
  order: int = 1
  label_order: int = 0
  z_axis: int | None = None
  order_z: int = 0

  def __post_init__(self):
    object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
    _require(all(s > 0 for s in self.spacing), "resample",
             f"spacing must be > 0, got {self.spacing}")
    for name in ("order", "label_order", "order_z"):
      _require(getattr(self, name) in range(6), "resample",
               f"{name} must be a spline order 0..5, got {getattr(self, name)}")

  def map(self, record: Record) -> Record:
    image = record["image"]
    nd = _spatial_ndim(image)
    _require("spacing" in record, "resample", "the record has no 'spacing'")
    old = np.asarray(record["spacing"], dtype=np.float64)
    _require(old.shape == (nd,), "resample",
             f"record spacing {tuple(old)} does not match the {nd}-D image")
    _require(len(self.spacing) == nd, "resample",
             f"target spacing {self.spacing} has {len(self.spacing)} entries for a {nd}-D image")
    shape = np.array(image.shape[:nd])
    new_shape = np.maximum(1, np.round(shape * old / np.array(self.spacing))).astype(int)
    step = shape / new_shape  # input voxels per output voxel
    if np.array_equal(new_shape, shape):
      out = _float_image(record)
    else:
      sample = _affine_sampler(np.diag(step), np.zeros(nd), tuple(new_shape))
      if self.z_axis is not None:
        _require(0 <= self.z_axis < nd, "resample", f"z_axis {self.z_axis} of a {nd}-D image")
        sample = _separate_z_sampler(step, new_shape, self.z_axis, self.order_z)
      # Samples stay within half a voxel of the grid except past the far edge when upsampling,
      # where the edge value is the right extension for both image and label.
      out = _warp(record, sample, order=self.order, label_order=self.label_order,
                  mode="nearest", label_mode="nearest")
    return {**out, "spacing": old * step}


@registry.register("transforms.crop_foreground")
@dataclasses.dataclass(frozen=True)
class CropForeground(grain.transforms.Map):
  """Crops image and label to the box of voxels where any channel exceeds ``threshold``.

  The box grows by ``margin`` voxels per side, clamped to the image; an image with no foreground
  is returned unchanged. ``record["spacing"]`` is unchanged (the grid is only cut).
  MONAI: ``CropForeground(select_fn=lambda x: x > threshold, margin=...)``; nnU-Net: cropping to
  the nonzero region; TorchIO: ``CropOrPad(mask_name=...)`` without the pad.

  Attributes:
    margin: voxels added on each side, one number or one per spatial axis.
    threshold: voxels with a channel value above it are foreground.
  """

  margin: int | Sequence[int] = 0
  threshold: float = 0.0

  def __post_init__(self):
    margins = np.atleast_1d(self.margin)
    _require(margins.ndim == 1 and np.all(margins >= 0) and np.all(margins == margins.astype(int)),
             "crop_foreground", f"margin must be integers >= 0, got {self.margin}")

  def map(self, record: Record) -> Record:
    image = record["image"]
    nd = _spatial_ndim(image)
    margin = np.atleast_1d(self.margin).astype(int)
    _require(margin.size in (1, nd), "crop_foreground",
             f"margin {self.margin} does not match the {nd}-D image")
    margin = np.broadcast_to(margin, (nd,))
    fg = np.nonzero(np.any(image > self.threshold, axis=-1))
    if fg[0].size == 0:
      return record
    box = tuple(slice(max(int(i.min()) - m, 0), min(int(i.max()) + 1 + m, n))
                for i, m, n in zip(fg, margin, image.shape))
    return _map_spatial(record, lambda x: x[box])


@registry.register("transforms.crop_or_pad")
@dataclasses.dataclass(frozen=True)
class CropOrPad(grain.transforms.Map):
  """Centre-crops or pads image and label to a target spatial shape (label padded with 0).

  An odd difference puts the extra voxel at the end, so padding then cropping back restores the
  input exactly. ``mode`` is ``np.pad``'s for the image. ``record["spacing"]`` is unchanged.
  MONAI: ``ResizeWithPadOrCrop``; TorchIO: ``CropOrPad``; nnU-Net: padding to the patch size.

  Attributes:
    shape: target spatial shape, one entry per spatial axis.
    mode: ``np.pad`` mode for the image: constant, edge, reflect, symmetric, minimum, mean...
    value: pad value for the image in ``constant`` mode.
  """

  shape: Sequence[int] = (128, 128)
  mode: str = "constant"
  value: float = 0.0

  _MODES = ("constant", "edge", "reflect", "symmetric", "wrap", "minimum", "maximum", "mean",
            "median", "linear_ramp")

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(self.shape))
    _require(all(isinstance(s, (int, np.integer)) and s > 0 for s in self.shape), "crop_or_pad",
             f"shape must be positive integers, got {self.shape}")
    _require(self.mode in self._MODES, "crop_or_pad",
             f"unknown mode {self.mode!r}; known: {list(self._MODES)}")

  def map(self, record: Record) -> Record:
    image = record["image"]
    nd = _spatial_ndim(image)
    _require(len(self.shape) == nd, "crop_or_pad",
             f"target shape {self.shape} has {len(self.shape)} entries for a {nd}-D image")
    crop = tuple(slice((n - t) // 2, (n - t) // 2 + t) if n > t else slice(None)
                 for n, t in zip(image.shape, self.shape))
    pad = [((t - n) // 2, t - n - (t - n) // 2) if t > n else (0, 0)
           for n, t in zip(image.shape, self.shape)] + [(0, 0)]
    kw = {"constant_values": self.value} if self.mode == "constant" else {}
    out = {**record, "image": np.ascontiguousarray(np.pad(image[crop], pad, self.mode, **kw))}
    label = _spatial_label(record)
    if label is not None:
      out["label"] = np.ascontiguousarray(np.pad(label[crop], pad))
    return out


# --- Spatial augmentation (random) ------------------------------------------------------------


def parse(spec: str) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """Builds the transforms of a ``"op1(...)|op2|..."`` spec (empty spec: no transforms)."""
  return [registry.lookup(op, "transforms.")() for op in spec.split("|") if op.strip()]
