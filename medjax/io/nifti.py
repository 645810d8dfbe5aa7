"""NIfTI-1/2 reading and writing (nibabel) to and from `Volume`, RAS+ throughout.

Reading applies the header's intensity scaling only where the header asks for it, so a uint8 image
stays uint8 and a float32 image stays float32 (real sets mix both: MSD Hippocampus does). Label maps
are read through `read_nifti_labels`, which checks that the values are whole numbers before
casting. Writing goes through a temporary file and a rename, so a crash never leaves half a file.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from medjax.io.atomic import atomic_path
from medjax.io.errors import MedjaxIOError
from medjax.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike) -> bool:
  return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Voxels (scaled only if the header says so) and the RAS+ affine of a NIfTI file."""
  if not os.path.isfile(path):
    raise MedjaxIOError(path, "no such file")
  try:
    image = nib.load(path, mmap=False)  # in memory: no open file behind the array
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
      raise MedjaxIOError(path, f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    slope, inter = image.dataobj.slope, image.dataobj.inter
    if (slope, inter) == (1.0, 0.0):
      data = np.asarray(image.dataobj.get_unscaled())
    else:
      data = np.asarray(image.get_fdata(dtype=np.float32))
    affine = np.asarray(image.affine, np.float64)
  except MedjaxIOError:
    raise
  except Exception as e:  # nibabel and gzip raise many types on corrupt files: all "unreadable"
    raise MedjaxIOError(path, f"unreadable NIfTI file ({type(e).__name__}: {e})") from e
  return data, affine


def _to_ijkc(path: str, data: np.ndarray) -> np.ndarray:
  """Reshapes 2-D to 5-D NIfTI data into ``[i, j, k, C]`` (the 4th NIfTI axis becomes channels)."""
  if data.ndim == 5 and data.shape[3] == 1:  # NIfTI puts vector data on the 5th axis, time 1
    data = data[:, :, :, 0, :]
  if data.ndim == 2:
    data = data[:, :, None]
  if data.ndim == 3:
    data = data[..., None]
  if data.ndim != 4:
    raise MedjaxIOError(path, f"expected a 2-D, 3-D or 4-D (channels) image, got shape "
                        f"{data.shape}")
  if 0 in data.shape:
    raise MedjaxIOError(path, f"empty image, shape {data.shape}")
  return data


def read_nifti(path: str | os.PathLike, canonical: bool = True, modality: str = "") -> Volume:
  """Reads a NIfTI image as a Volume; ``canonical`` reorders axes to the closest RAS+.

  A 4-D file (MSD multi-modal images) gives one channel per volume along its 4th axis.
  """
  path = os.fspath(path)
  data, affine = _load(path)
  data = _to_ijkc(path, data)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
    raise MedjaxIOError(path, f"degenerate affine in the header: {affine.tolist()}")
  metadata = {"format": "nifti", "source_dtype": str(data.dtype)}
  volume = Volume.from_affine(data, affine, modality=modality,
                              metadata=metadata)
  return volume.to_canonical() if canonical else volume


def read_nifti_labels(path: str | os.PathLike, canonical: bool = True,
                      num_classes: int | None = None) -> Volume:
  """Reads an integer label map (``[i, j, k, 1]``, int32 unless the file's integer type is smaller).

  Float-typed files (common in the wild) are accepted when every value is a whole number.
  ``num_classes``, when given, rejects labels outside ``[0, num_classes)``.
  """
  path = os.fspath(path)
  volume = read_nifti(path, canonical=canonical)
  data = volume.array
  if volume.channels != 1:
    raise MedjaxIOError(path, f"a label map must have one channel, got shape {data.shape[:4]}")
  if not np.issubdtype(data.dtype, np.integer):
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
      raise MedjaxIOError(path, "label map holds non-integer values")
    data = data.astype(np.int32)
  elif data.dtype.itemsize > 4 or data.dtype == np.uint32:
    data = data.astype(np.int32)
  if data.min() < 0:
    raise MedjaxIOError(path, f"label map holds negative labels (min {data.min()})")
  if num_classes is not None and data.max() >= num_classes:
    found = sorted(int(v) for v in np.unique(data) if v >= num_classes)
    raise MedjaxIOError(path, f"labels {found} outside the {num_classes} declared classes")
  return volume.replace(array=data)


def write_nifti(volume: Volume, path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
  """Writes a Volume (image or label map) as NIfTI-1 with its affine in both qform and sform.

  One channel is written as a 3-D image, several as 4-D. ``dtype`` casts on the way out.
  """
  path = os.fspath(path)
  if not is_nifti_path(path):
    raise ValueError(f"{path}: a NIfTI path ends in .nii or .nii.gz")
  data = volume.array if volume.channels > 1 else volume.array[..., 0]
  if dtype is not None:
    data = data.astype(dtype)
  image = nib.Nifti1Image(data, volume.affine)
  image.set_qform(volume.affine, code=1)
  image.set_sform(volume.affine, code=1)
  image.header.set_xyzt_units("mm")
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  suffix = ".nii.gz" if path.lower().endswith(".gz") else ".nii"
  with atomic_path(path, suffix=suffix) as tmp:  # nibabel picks the format by the suffix
    nib.save(image, tmp)
