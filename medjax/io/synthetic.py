"""Synthetic DICOM series written with pydicom, for tests, benchmarks and demos without real data.

The files are valid CT Image Storage objects (uncompressed, explicit VR little endian) with a real
patient geometry, so every code path of the series reader runs on them: oblique orientations,
shuffled file names, missing slices, several series in one folder, identity markers.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
  """HU values ``[k, rows, cols]``: air around a soft-tissue ellipsoid holding a bone sphere."""
  k, r, c = shape
  z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
  hu = np.full(shape, -1000.0)
  hu[(x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1] = 40.0
  hu[(x - 0.2) ** 2 + y**2 + z**2 < 0.1] = 700.0
  hu += np.random.default_rng(seed).normal(0, 10, shape)
  return hu.round().astype(np.int16)


def write_ct_series(
    folder: str | os.PathLike,
    hu: np.ndarray,
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-200.0, -180.0, -300.0),
    skip: Sequence[int] = (),
    shuffle_names: bool = True,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    patient: dict[str, str] | None = None,
    seed: int = 0,
) -> list[str]:
  """Writes ``hu`` (``[k, rows, cols]``) as one file per slice; returns the paths in slice order.

  Args:
    folder: where to write (created).
    hu: voxel values in HU; stored as int16 with RescaleIntercept -1024, slope 1.
    spacing: (column spacing, row spacing, slice spacing) in mm.
    orientation: ImageOrientationPatient (row cosine, column cosine), LPS.
    origin: ImagePositionPatient of slice 0, LPS.
    skip: slice indices not written (a series with missing slices).
    shuffle_names: name files in a random order unrelated to their position (and InstanceNumber
      in reverse), so a reader that sorts by either gets it wrong.
    series_uid: SeriesInstanceUID (a new one by default).
    frame_uid: FrameOfReferenceUID (a new one by default); series written with the same one share
      a patient frame (as the series of one study do).
    patient: PatientName/PatientID/PatientBirthDate... values to write (for privacy tests).
    seed: for the file names.
  """
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  orientation = np.asarray(orientation, np.float64)
  normal = np.cross(orientation[:3], orientation[3:])
  series_uid = series_uid or generate_uid()
  study_uid, frame_uid = generate_uid(), frame_uid or generate_uid()
  n = hu.shape[0]
  names = np.random.default_rng(seed).permutation(n) if shuffle_names else np.arange(n)
  paths = []
  for z in range(n):
    if z in skip:
      continue
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
        study_uid, series_uid, frame_uid)
    for keyword, value in (patient or {}).items():
      setattr(ds, keyword, value)
    ds.InstanceNumber = n - z
    position = np.asarray(origin) + z * spacing[2] * normal
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [spacing[1], spacing[0]]
    ds.SliceThickness = spacing[2]
    ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.PixelData = (hu[z].astype(np.int32) + 1024).astype(np.int16).tobytes()
    path = os.path.join(folder, f"IM{names[z]:05d}.dcm")
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths
