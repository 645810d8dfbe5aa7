"""Separate series of one patient onto one voxel grid, from their DICOM/NIfTI geometry alone.

`resample_to` samples a moving `Volume` at the voxel centres of a reference grid (its affine and
shape): every reference voxel is mapped to world (RAS+ mm) and back into the moving series' voxel
indices, so different spacing, field of view, oblique planes and LPS- or RAS-ordered storage all
come out right; images are interpolated linearly, label maps by nearest neighbour. Reference voxels
outside the moving series' field of view get ``fill`` (0), never a stretched edge. `align` does it
for several series and `stack_channels` puts them side by side as channels; `read_aligned` reads
files/folders and does both.

This is resampling, not registration: it trusts the stored geometry. So before anything is moved,
`check_alignable` refuses (`GeometryError`) what would be silently misaligned:
- DICOM series on different FrameOfReferenceUIDs: their world coordinates are not comparable,
  unless the caller says they were registered anyway (``assume_registered``). Images without a
  frame of reference (NIfTI) cannot be checked and are taken to share the reference's scanner
  space, as every NIfTI tool does.
- series that do not overlap in space, or whose overlap is below ``min_overlap`` (`MIN_OVERLAP`):
  the fraction of the *smaller* of the two fields of view that lies inside the other, estimated on
  a lattice of points across each voxel box.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
from scipy import ndimage

from medjax.io import read_volume
from medjax.io.dicom_frames import FRAME_OF_REFERENCE_KEY
from medjax.io.errors import GeometryError, MedjaxIOError
from medjax.io.nifti import is_nifti_path, read_nifti_labels
from medjax.io.volume import Volume, grid_mismatch

log = logging.getLogger(__name__)

# Default least overlap: half of the smaller field of view must lie inside the other one. A
# head MR inside a whole-body PET passes (all of the MR is inside); two slabs sharing a corner
# do not.
MIN_OVERLAP = 0.5
# Points per axis of the lattice on which overlap is estimated (16³ per volume: instant, and a
# 1/16 resolution is enough to tell "no overlap" and "a sliver" from "the same anatomy").
_OVERLAP_SAMPLES = 16
# Slack (voxels) on the field-of-view test, for rounding in affines that agree.
_EDGE_SLACK = 1e-6


def _footprint(volume: Volume) -> np.ndarray:
  """World corners ``[8, 3]`` of the volume's voxel box (voxel centres ± half a voxel)."""
  hi = np.asarray(volume.shape, np.float64) - 0.5
  corners = np.array([[a, b, c] for a in (-0.5, hi[0]) for b in (-0.5, hi[1])
                      for c in (-0.5, hi[2])])
  return volume.voxel_to_world(corners)


def _inside(indices: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Whether continuous voxel indices ``[..., 3]`` fall in the voxel box of a grid of ``shape``."""
  hi = np.asarray(shape, np.float64) - 0.5 + _EDGE_SLACK
  return np.all((indices >= -0.5 - _EDGE_SLACK) & (indices <= hi), axis=-1)


def _covered(voxel_map: np.ndarray, shape: Sequence[int], source_shape: Sequence[int]
             ) -> np.ndarray:
  """Which voxels of a grid of ``shape`` map (through the 4×4 ``voxel_map``) into the voxel box
  of a grid of ``source_shape``; one moving axis at a time, so no [*shape, 3] array is made."""
  index = [np.arange(n, dtype=np.float64).reshape([-1 if a == b else 1 for b in range(3)])
           for a, n in enumerate(shape)]
  covered = np.ones(tuple(shape), bool)
  for a, n in enumerate(source_shape):
    row = voxel_map[a]
    coordinate = row[0] * index[0] + row[1] * index[1] + row[2] * index[2] + row[3]
    covered &= (coordinate >= -0.5 - _EDGE_SLACK) & (coordinate <= n - 0.5 + _EDGE_SLACK)
  return covered


def _fraction_inside(source: Volume, target: Volume, samples: int = _OVERLAP_SAMPLES) -> float:
  """The fraction of ``source``'s voxel box (its field of view) that lies inside ``target``'s."""
  axes = [(np.arange(samples) + 0.5) / samples * n - 0.5 for n in source.shape]
  lattice = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
  return float(np.mean(_inside(target.world_to_voxel(source.voxel_to_world(lattice)),
                               target.shape)))


def overlap_fraction(reference: Volume, moving: Volume) -> float:
  """The fraction of the smaller field of view that lies inside the larger (0: disjoint, 1: one
  holds the other), estimated on a lattice of `_OVERLAP_SAMPLES`³ points in each."""
  return max(_fraction_inside(reference, moving), _fraction_inside(moving, reference))


def _extent(volume: Volume) -> str:
  corners = _footprint(volume)
  low, high = corners.min(axis=0), corners.max(axis=0)
  return ", ".join(f"{axis} {a:.1f}..{b:.1f}" for axis, a, b in zip("xyz", low, high))


def check_alignable(reference: Volume, moving: Volume, moving_name: str,
                    reference_name: str = "the reference", assume_registered: bool = False,
                    min_overlap: float = MIN_OVERLAP) -> float:
  """Refuses a pair whose stored geometry cannot be trusted to align them; returns the overlap.

  Args:
    moving_name, reference_name: how the error names the two images (their paths).
    assume_registered: accept DICOM series on different frames of reference (registered by other
      means, their positions already in one space).
    min_overlap: least `overlap_fraction` accepted, in (0, 1]; any value still requires some.

  Raises:
    GeometryError: different frames of reference (without ``assume_registered``), no overlap, or
      an overlap below ``min_overlap``.
  """
  if not 0.0 < min_overlap <= 1.0:
    raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
  frames = (reference.metadata.get(FRAME_OF_REFERENCE_KEY),
            moving.metadata.get(FRAME_OF_REFERENCE_KEY))
  if None not in frames and frames[0] != frames[1] and not assume_registered:
    raise GeometryError(moving_name, f"is on another DICOM frame of reference than "
                        f"{reference_name} (FrameOfReferenceUID differs), so their positions "
                        "are not in one space; register them, or pass assume_registered "
                        "(--assume_registered) if they already are")
  overlap = overlap_fraction(reference, moving)
  if overlap == 0.0:
    raise GeometryError(moving_name, f"does not overlap {reference_name} in space: its field of "
                        f"view spans {_extent(moving)} mm (RAS), the reference's "
                        f"{_extent(reference)} mm")
  if overlap < min_overlap:
    raise GeometryError(moving_name, f"overlaps {reference_name} by only {overlap:.0%} of the "
                        f"smaller field of view (min_overlap {min_overlap:.0%}): its field of "
                        f"view spans {_extent(moving)} mm (RAS), the reference's "
                        f"{_extent(reference)} mm")
  return overlap


def resample_to(moving: Volume, reference: Volume, label: bool = False,
                fill: float = 0.0) -> Volume:
  """``moving`` sampled at the voxel centres of ``reference``'s grid (its affine and shape).

  Linear interpolation (float32 output) for images, nearest neighbour (dtype kept) for label
  maps. Reference voxels outside ``moving``'s voxel box get ``fill``; within half a voxel of its
  edge they take the edge value. A moving grid equal to the reference's (within
  `medjax.io.volume.GRID_TOLERANCE`) is copied, not interpolated. ``metadata["alignment"]``
  records the fraction of reference voxels covered and whether values were interpolated.
  """
  dtype = moving.array.dtype if label else np.dtype(np.float32)
  if label and dtype.kind == "b":
    dtype = np.dtype(np.uint8)  # ndimage rejects bool
  if grid_mismatch(reference, moving) is None:
    array, coverage, resampled = moving.array.astype(dtype), 1.0, False
  else:
    # Reference voxel index → world → moving voxel index, one homogeneous 4×4 map.
    voxel_map = np.linalg.inv(moving.affine) @ reference.affine
    array = np.empty(reference.shape + (moving.channels,), dtype)
    for c in range(moving.channels):
      ndimage.affine_transform(moving.array[..., c].astype(dtype), voxel_map,
                               output_shape=reference.shape, output=array[..., c],
                               order=0 if label else 1, mode="nearest")
    covered = _covered(voxel_map, reference.shape, moving.shape)
    array[~covered] = fill
    coverage, resampled = float(np.mean(covered)), True
  metadata = {**moving.metadata,
              "alignment": {"coverage": coverage, "resampled": resampled, "label": label}}
  return Volume(array, reference.spacing, reference.origin, reference.direction,
                modality=moving.modality, metadata=metadata)


def align(reference: Volume, moving: Sequence[Volume], names: Sequence[str],
          reference_name: str = "the reference", label: bool = False,
          assume_registered: bool = False, min_overlap: float = MIN_OVERLAP) -> list[Volume]:
  """Each of ``moving`` (named by ``names`` in errors) checked, then resampled onto
  ``reference``'s grid (see `check_alignable`, `resample_to`)."""
  if len(moving) != len(names):
    raise ValueError(f"{len(moving)} volumes but {len(names)} names")
  for volume, name in zip(moving, names):  # every check before any resampling
    check_alignable(reference, volume, name, reference_name, assume_registered, min_overlap)
  out = [resample_to(volume, reference, label=label) for volume in moving]
  for volume, name in zip(out, names):
    coverage = volume.metadata["alignment"]["coverage"]
    if coverage < 1.0:
      log.info("%s covers %.0f%% of %s's grid; the rest is filled with 0", name,
               100 * coverage, reference_name)
  return out


def stack_channels(volumes: Sequence[Volume], names: Sequence[str]) -> Volume:
  """Volumes on one grid as the channels of one (in order; dtype promoted to a common one).

  ``metadata["channels"]`` lists ``names``, one per channel (a multi-channel input repeats its
  name), and ``metadata["alignment"]`` each volume's alignment record.
  """
  first = volumes[0]
  for volume, name in zip(volumes[1:], names[1:]):
    problem = grid_mismatch(first, volume)
    if problem is not None:
      raise ValueError(f"{name} is not on the grid of {names[0]}: {problem}; align it first")
  array = np.concatenate([v.array for v in volumes], axis=-1)
  channels = [name for v, name in zip(volumes, names) for _ in range(v.channels)]
  metadata = {"channels": channels,
              "alignment": [v.metadata.get("alignment", {"reference": True}) for v in volumes]}
  modalities = {v.modality for v in volumes}
  return Volume(array, first.spacing, first.origin, first.direction,
                modality=modalities.pop() if len(modalities) == 1 else "", metadata=metadata)


def read_labels(path: str | os.PathLike) -> Volume:
  """A label map (NIfTI file, or a DICOM image series/file such as a mask exported as images):
  one channel of whole non-negative numbers, as int32 (uint8 when all fit)."""
  path = os.fspath(path)
  if is_nifti_path(path):
    volume = read_nifti_labels(path)
  else:
    volume = read_volume(path)
    data = volume.array
    if volume.channels != 1:
      raise MedjaxIOError(path, f"a label map must have one channel, got {volume.channels}")
    if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or np.any(data != np.round(data))):
      raise MedjaxIOError(path, "label map holds non-integer values")
    if data.min() < 0:
      raise MedjaxIOError(path, f"label map holds negative labels (min {data.min()})")
  data = volume.array
  return volume.replace(array=data.astype(np.uint8 if data.max() < 256 else np.int32))


def read_aligned(reference: str | os.PathLike, moving: Sequence[str | os.PathLike],
                 labels: Sequence[str | os.PathLike] = (), assume_registered: bool = False,
                 min_overlap: float = MIN_OVERLAP) -> tuple[Volume, Volume | None]:
  """Reads a reference and moving images (NIfTI files, DICOM files or series folders) and label
  maps, and brings them onto the reference's grid.

  Returns:
    ``(images, labels)``: the reference then each moving image as float32 channels
    (``metadata["channels"]`` names their paths), and the label maps as channels (nearest
    neighbour; None without ``labels``).

  Raises:
    MedjaxIOError: a file cannot be read; `GeometryError` (a subclass): see `check_alignable`.
  """
  reference = os.fspath(reference)
  names = [os.fspath(p) for p in moving]
  label_names = [os.fspath(p) for p in labels]
  ref = read_volume(reference)
  images = align(ref, [read_volume(p) for p in names], names, reference, label=False,
                 assume_registered=assume_registered, min_overlap=min_overlap)
  stacked = stack_channels([resample_to(ref, ref), *images], [reference, *names])
  if not label_names:
    return stacked, None
  masks = align(ref, [read_labels(p) for p in label_names], label_names, reference, label=True,
                assume_registered=assume_registered, min_overlap=min_overlap)
  return stacked, stack_channels(masks, label_names)
