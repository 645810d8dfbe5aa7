"""Helpers the transforms share: record access, argument checks, and warping arrays (with a
segmentation label alongside) onto a new voxel grid."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

Record = dict[str, Any]
Range = float | tuple[float, float]
# (one channel, spline order, scipy boundary mode) -> that channel on the output grid.
Sampler = Callable[[np.ndarray, int, str], np.ndarray]

# Images take the edge value outside the grid; labels take background. scipy's "constant" would
# also zero an edge voxel whose coordinate lands 1e-9 outside [0, n - 1] after a rotation;
# "grid-constant" pads with the same 0 but keeps nearest-neighbour lookups up to half a voxel out.
_IMAGE_MODE = "nearest"
_LABEL_MODE = "grid-constant"


def _spatial_ndim(image: np.ndarray) -> int:
  return image.ndim - 1  # channels-last


def _spatial_label(record: Record) -> np.ndarray | None:
  """The record's label when it is a segmentation map on the image grid, else None."""
  label = record.get("label")
  if not isinstance(label, np.ndarray):
    return None
  return label if label.shape[:-1] == record["image"].shape[:-1] else None


def _require(ok: bool, op: str, problem: str) -> None:
  if not ok:
    raise ValueError(f"{op}: {problem}")


def _check_p(op: str, p: float) -> None:
  _require(0.0 <= p <= 1.0, op, f"probability p={p} is not in [0, 1]")


def _as_range(op: str, name: str, value: Range, low: float = -np.inf) -> tuple[float, float]:
  """Normalises a number or ``(lo, hi)`` pair to a pair, checking ``low <= lo <= hi``."""
  pair = (value, value) if np.isscalar(value) else tuple(value)
  _require(len(pair) == 2 and low <= pair[0] <= pair[1], op,
           f"{name}={value} must be a number or (lo, hi) with {low} <= lo <= hi")
  lo, hi = pair
  return float(lo), float(hi)


def _sample_around_one(rng: np.random.Generator, lo: float, hi: float) -> float:
  # nnU-Net's rule: half the draws shrink (from [lo, 1)) and half grow, whatever the range's skew.
  if lo < 1 and rng.random() < 0.5:
    return rng.uniform(lo, min(hi, 1.0))
  return rng.uniform(max(lo, 1.0), hi) if hi >= 1 else rng.uniform(lo, hi)


def _float_image(record: Record) -> Record:
  return {**record, "image": np.ascontiguousarray(record["image"], dtype=np.float32)}


def _map_spatial(record: Record, fn: Callable[[np.ndarray], np.ndarray]) -> Record:
  """Applies one voxel-exact geometric change (flip, rot90, crop) to image and spatial label."""
  out = {**record, "image": np.ascontiguousarray(fn(record["image"]))}
  label = _spatial_label(record)
  if label is not None:
    out["label"] = np.ascontiguousarray(fn(label))
  return out


def _resample_channels(array: np.ndarray, sample: Sampler, order: int, mode: str) -> np.ndarray:
  return np.stack([sample(array[..., c], order, mode) for c in range(array.shape[-1])], axis=-1)


def _resample_label(label: np.ndarray, sample: Sampler, order: int, mode: str) -> np.ndarray:
  if order == 0:
    work = label.view(np.uint8) if label.dtype == bool else label  # ndimage rejects bool
    return _resample_channels(work, sample, 0, mode).astype(label.dtype)
  # Interpolating class ids would invent classes between them; like nnU-Net's
  # resize_segmentation, interpolate each class's indicator and keep the strongest class.
  classes = np.unique(label)
  scores = np.stack([_resample_channels((label == k).astype(np.float32), sample, order, mode)
                     for k in classes])
  return classes[np.argmax(scores, axis=0)].astype(label.dtype)


def _warp(record: Record, sample: Sampler, *, order: int = 1, label_order: int = 0,
          mode: str = _IMAGE_MODE, label_mode: str = _LABEL_MODE) -> Record:
  """Resamples the image (as float32) and any spatial label through the same coordinate map."""
  image = record["image"].astype(np.float32)
  out = {**record, "image": _resample_channels(image, sample, order, mode)}
  label = _spatial_label(record)
  if label is not None:
    out["label"] = _resample_label(label, sample, label_order, label_mode)
  return out


def _affine_sampler(matrix: np.ndarray, offset: np.ndarray,
                    output_shape: Sequence[int] | None = None) -> Sampler:
  """Samples output voxel ``o`` at input coordinate ``matrix @ o + offset``."""
  return lambda x, order, mode: ndimage.affine_transform(
      x, matrix, offset, output_shape=output_shape, order=order, mode=mode, cval=0.0)


def separate_z_axis(spacing: Sequence[float], target: Sequence[float],
                    anisotropy: float) -> int | None:
  """nnU-Net's separate-z rule: the axis to resample on its own, or None.

  When the current spacing is anisotropic (coarsest / finest > ``anisotropy``) its coarsest axis,
  else when the target spacing is, the target's; None when neither is, or when the coarsest
  spacing is shared by several axes (nnU-Net v2's ``get_do_separate_z`` and ``get_lowres_axis``
  in ``preprocessing/resampling/default_resampling.py``).
  """
  for s in (spacing, target):
    s = np.asarray(s, np.float64)
    if s.max() / s.min() > anisotropy:
      coarse = np.flatnonzero(s == s.max())
      return int(coarse[0]) if len(coarse) == 1 else None
  return None


def _separate_z_sampler(step: np.ndarray, output_shape: Sequence[int], axis: int,
                        order_z: int) -> Sampler:
  """Samples output voxel ``o`` at input coordinate ``step * o`` in two passes, as nnU-Net's
  separate-z resampling: each slice across ``axis`` in-plane with the caller's order, then along
  ``axis`` alone with ``order_z`` (0: every output slice is one input slice, never a blend)."""
  output_shape = tuple(int(n) for n in output_shape)
  plane = [a for a in range(len(step)) if a != axis]

  def sample(x: np.ndarray, order: int, mode: str) -> np.ndarray:
    slices = [ndimage.affine_transform(np.take(x, k, axis), np.diag(step[plane]),
                                       output_shape=[output_shape[a] for a in plane],
                                       order=order, mode=mode) for k in range(x.shape[axis])]
    inplane = np.stack(slices, axis)
    if x.shape[axis] == output_shape[axis]:
      return inplane
    along = np.ones(len(step))
    along[axis] = step[axis]
    return ndimage.affine_transform(inplane, np.diag(along), output_shape=output_shape,
                                    order=order_z, mode=mode)

  return sample


def _random_rotation(nd: int, rng: np.random.Generator, degrees: float) -> np.ndarray:
  """Product of one uniform ``[-degrees, degrees]`` rotation per plane of the spatial axes."""
  matrix = np.eye(nd)
  for a, b in itertools.combinations(range(nd), 2):
    theta = np.deg2rad(rng.uniform(-degrees, degrees))
    r = np.eye(nd)
    r[a, a] = r[b, b] = np.cos(theta)
    r[a, b], r[b, a] = -np.sin(theta), np.sin(theta)
    matrix = matrix @ r
  return matrix


def _about_centre(record: Record, matrix: np.ndarray, shift: np.ndarray | float = 0.0) -> Record:
  """Warps image and label by ``matrix`` about the grid centre, then moves them by ``shift``."""
  shape = np.array(record["image"].shape[:-1], dtype=np.float64)
  centre = (shape - 1) / 2
  return _warp(record, _affine_sampler(matrix, centre - matrix @ centre - shift))
