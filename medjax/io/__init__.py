"""Readers for medical image files; every failure is a MedjaxIOError naming the file and cause."""

from __future__ import annotations

import os

from medjax.io.dicom import (
  SeriesInfo,
  list_dicom_series,
  read_dicom,
  read_dicom_file,
  read_dicom_series,
)
from medjax.io.errors import MedjaxIOError
from medjax.io.medmnist import INFO as MEDMNIST_INFO
from medjax.io.medmnist import MedMNISTInfo, MedMNISTSplit, download_medmnist, load_medmnist
from medjax.io.nifti import is_nifti_path, read_nifti, read_nifti_labels, write_nifti
from medjax.io.volume import Volume


def read_volume(path: str | os.PathLike, **kwargs) -> Volume:
  """Reads any image medjax knows: a NIfTI file, a DICOM file, a DICOM folder or DICOMDIR."""
  if is_nifti_path(path):
    return read_nifti(path, **kwargs)
  return read_dicom(path, **kwargs)


__all__ = [
    "MEDMNIST_INFO",
    "MedMNISTInfo",
    "MedMNISTSplit",
    "MedjaxIOError",
    "SeriesInfo",
    "Volume",
    "download_medmnist",
    "list_dicom_series",
    "load_medmnist",
    "read_dicom",
    "read_dicom_file",
    "read_dicom_series",
    "read_nifti",
    "read_nifti_labels",
    "read_volume",
    "write_nifti",
]
