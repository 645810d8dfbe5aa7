"""`Volume`: one in-memory type for every image medjax reads (DICOM, NIfTI), with its geometry.

Conventions (the same as nibabel and MONAI, so NIfTI round-trips without a flip):
- ``array`` is indexed ``[i, j, k, c]``: three spatial axes, channels last. A 2-D image (a
  radiograph, one DICOM slice) has ``k`` of size 1; for DICOM, ``i`` runs along a row (columns)
  and ``j`` down the rows, so ``array[:, :, 0, 0].T`` is the picture as a viewer shows it. The
  memory layout is the reader's (NIfTI and DICOM series come with ``i`` varying fastest, as
  nibabel gives them); ``np.ascontiguousarray`` where a C layout matters.
- World coordinates are **RAS+** millimetres (nibabel's): +x towards the patient's Right, +y
  Anterior, +z Superior. Readers convert at the edge: DICOM's patient frame is LPS+ (+x Left,
  +y Posterior), so its x and y change sign on the way in; NIfTI is RAS+ already.
- ``affine`` maps a voxel index ``(i, j, k, 1)`` to world ``(x, y, z, 1)``:
  ``affine[:3, :3] = direction @ diag(spacing)`` and ``affine[:3, 3] = origin`` (the centre of
  voxel 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import nibabel as nib
import numpy as np

# DICOM's patient frame is LPS+ and NIfTI's is RAS+: the two differ by the sign of x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """An image with its voxel grid in world space.

  Attributes:
    array: ``[i, j, k, C]`` voxels, float32 or the source dtype.
    spacing: voxel size in mm along ``i, j, k``.
    origin: world position (RAS+, mm) of the centre of voxel ``(0, 0, 0)``.
    direction: 3×3; column ``n`` is the unit world direction of axis ``n``.
    modality: ``"CT"``, ``"MR"``, ``"CR"``... or ``""`` where the source does not say.
    metadata: de-identified facts about the acquisition (never patient identity, see ``dicom.py``).
  """

  array: np.ndarray
  spacing: np.ndarray
  origin: np.ndarray
  direction: np.ndarray
  modality: str = ""
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.array.ndim != 4:
      raise ValueError(f"Volume.array must be [i, j, k, C], got shape {self.array.shape}")
    spacing = np.asarray(self.spacing, np.float64).reshape(3)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
      raise ValueError(f"Volume.spacing must be positive and finite, got {spacing}")
    origin = np.asarray(self.origin, np.float64).reshape(3)
    direction = np.asarray(self.direction, np.float64).reshape(3, 3)
    if not (np.all(np.isfinite(origin)) and np.all(np.isfinite(direction))):
      raise ValueError("Volume.origin and direction must be finite")
    if abs(np.linalg.det(direction)) < 1e-6:
      raise ValueError(f"Volume.direction is singular: {direction.tolist()}")
    object.__setattr__(self, "spacing", spacing)
    object.__setattr__(self, "origin", origin)
    object.__setattr__(self, "direction", direction)

  @classmethod
  def from_affine(cls, array: np.ndarray, affine: np.ndarray, **kwargs) -> Volume:
    """Builds a Volume from a RAS+ voxel-to-world affine (columns need not be unit length)."""
    affine = np.asarray(affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
      raise ValueError(f"affine has a zero-length axis: {affine.tolist()}")
    return cls(array, spacing, affine[:3, 3], affine[:3, :3] / spacing, **kwargs)

  @property
  def affine(self) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = self.direction * self.spacing
    affine[:3, 3] = self.origin
    return affine

  @property
  def shape(self) -> tuple[int, int, int]:
    """The spatial shape ``(i, j, k)``."""
    return tuple(self.array.shape[:3])

  @property
  def channels(self) -> int:
    return self.array.shape[3]

  @property
  def orientation(self) -> str:
    """Axis codes like ``"RAS"`` or ``"LPI"``: the world direction each voxel axis points to."""
    return "".join(nib.orientations.aff2axcodes(self.affine))

  def replace(self, **changes) -> Volume:
    return dataclasses.replace(self, **changes)

  def to_canonical(self) -> Volume:
    """The same image, axes permuted/flipped to the closest RAS+ order (nibabel's canonical).

    Only whole-axis flips and permutations: voxels are moved, never interpolated, so an oblique
    direction stays oblique (as ``nibabel.as_closest_canonical``).
    """
    return self.reoriented(np.eye(4))

  def reoriented(self, like_affine: np.ndarray) -> Volume:
    """The same image with its axes permuted/flipped to the orientation of ``like_affine``
    (e.g. an input file's, to write a prediction back the way the input was stored)."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(self.affine),
                                           nib.orientations.io_orientation(like_affine))
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
      return self
    array = nib.orientations.apply_orientation(self.array, ornt)
    transform = nib.orientations.inv_ornt_aff(ornt, self.shape)
    return Volume.from_affine(array, self.affine @ transform, modality=self.modality,
                              metadata=dict(self.metadata))

  def world_to_voxel(self, points: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of RAS+ world points ``[..., 3]``."""
    points = np.asarray(points, np.float64)
    inv = np.linalg.inv(self.affine)
    return points @ inv[:3, :3].T + inv[:3, 3]

  def voxel_to_world(self, indices: np.ndarray) -> np.ndarray:
    """RAS+ world points of voxel indices ``[..., 3]``."""
    indices = np.asarray(indices, np.float64)
    affine = self.affine
    return indices @ affine[:3, :3].T + affine[:3, 3]

  def __repr__(self) -> str:
    return (f"Volume(shape={self.array.shape}, dtype={self.array.dtype}, "
            f"spacing={np.round(self.spacing, 4).tolist()}, orientation={self.orientation}, "
            f"modality={self.modality!r})")


# Grids whose affines differ by less than this (mm, or direction units) are the same grid.
GRID_TOLERANCE = 1e-3


def grid_mismatch(a: Volume, b: Volume, tolerance: float = GRID_TOLERANCE) -> str | None:
  """Why ``b`` is not on ``a``'s voxel grid (shape or affine), or None when it is."""
  if a.shape != b.shape:
    return f"shape {b.shape} differs from {a.shape}"
  gap = float(np.max(np.abs(a.affine - b.affine)))
  if gap > tolerance:
    return f"affine differs by up to {gap:.3g} (origin, spacing or direction)"
  return None


def nonfinite_problem(array: np.ndarray) -> str | None:
  """Why ``array``'s values cannot be an image's: how many are NaN or ±inf; None when all are
  finite (integer arrays always are).

  A network given NaN returns a confident-looking answer (the same for any NaN image), so
  readers of user images refuse such files, or repair them on request (`fill_nonfinite`).
  """
  if array.dtype.kind != "f":
    return None
  finite = np.isfinite(array)
  bad = finite.size - int(np.count_nonzero(finite))
  if not bad:
    return None
  nan = int(np.count_nonzero(np.isnan(array)))
  pos = int(np.count_nonzero(np.isposinf(array)))
  kinds = ", ".join(f"{n} {name}" for n, name in ((nan, "NaN"), (pos, "+inf"),
                                                 (bad - nan - pos, "-inf")) if n)
  return f"{bad} of {array.size} voxel values are not finite ({kinds})"


def fill_nonfinite(volume: Volume) -> tuple[Volume, str | None]:
  """``volume`` with each channel's NaN and -inf set to its finite minimum, +inf to its maximum.

  Returns:
    ``(volume, note)``: the repaired volume and what was done (`nonfinite_problem`'s text plus
    the fill), or the volume unchanged and None when every value was finite.

  Raises:
    ValueError: a channel holds no finite value to fill from.
  """
  problem = nonfinite_problem(volume.array)
  if problem is None:
    return volume, None
  array = np.array(volume.array)  # a copy: the reader's array stays as read
  for c in range(array.shape[-1]):
    channel = array[..., c]
    finite = channel[np.isfinite(channel)]
    if not finite.size:
      raise ValueError(f"{problem}; channel {c} has no finite value to fill them from")
    low, high = finite.min(), finite.max()
    channel[np.isnan(channel) | np.isneginf(channel)] = low
    channel[np.isposinf(channel)] = high
  note = f"{problem}; NaN and -inf set to the finite minimum, +inf to the finite maximum"
  return volume.replace(array=array), note
