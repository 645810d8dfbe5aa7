"""DICOM-SEG writing: a label map as a segmentation object that references its source series.

`write_dicom_seg` maps a label map on the series' grid pixel for pixel onto the source frames
(`dicom_seg_frames`) and writes the SEG with highdicom; `medjax.infer.predict` calls it for DICOM
inputs.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from medjax.io.atomic import atomic_path
from medjax.io.volume import LPS_TO_RAS, Volume

# The Type 2 attributes of the Patient and General Study modules highdicom copies to a DICOM-SEG:
# present (possibly empty) in conformant images, missing in some exports; added empty then.
_SEG_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
              "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
# A source pixel must fall within this many voxels of a label-map voxel centre: the SEG copies
# labels, it never interpolates them.
_ON_GRID_VOXELS = 0.1
_SEG_SERIES_NUMBER = 9901
_PRIVATE_SCHEME = "99MEDJAX"  # a local coding scheme ("99" prefix, PS3.16) for run class names



def _numbers(value: Any, n: int, what: str) -> np.ndarray:
  try:
    out = np.asarray([float(v) for v in value], np.float64)
  except (TypeError, ValueError):
    out = np.zeros(0)
  if out.shape != (n,) or not np.all(np.isfinite(out)):
    raise ValueError(f"DICOM-SEG needs the source's {what} ({n} numbers)")
  return out


def _frame_planes(ds: pydicom.Dataset) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """``(ImagePositionPatient, ImageOrientationPatient, PixelSpacing)`` of each frame (LPS)."""
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  per_frame = ds.get("PerFrameFunctionalGroupsSequence")
  shared = ds.get("SharedFunctionalGroupsSequence")
  if per_frame is None and shared is None:
    groups = [(ds, ds, ds)] * frames
  else:
    def find(f: int, sequence: str) -> pydicom.Dataset | None:
      for items, index in ((per_frame, f), (shared, 0)):
        if items and len(items) > index and items[index].get(sequence):
          return items[index][sequence][0]
      return None

    groups = [(find(f, "PlanePositionSequence"), find(f, "PlaneOrientationSequence"),
               find(f, "PixelMeasuresSequence")) for f in range(frames)]
  return [(_numbers(p and p.get("ImagePositionPatient"), 3, "ImagePositionPatient"),
           _numbers(o and o.get("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
           _numbers(m and m.get("PixelSpacing"), 2, "PixelSpacing")) for p, o, m in groups]


def _sample_frame(labels: Volume, position: np.ndarray, orientation: np.ndarray,
                  spacing: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """The label map's voxels at the pixels of one source frame, ``[rows, cols]``.

  Pixel ``(r, c)`` lies at ``position + c·Δcol·row_cosine + r·Δrow·column_cosine`` (LPS, PS3.3
  C.7.6.2.1.1; PixelSpacing is (Δrow, Δcol)); each must fall on a voxel centre of ``labels``,
  whatever the two grids' axis orders, or this raises ``ValueError``.
  """
  row_cos, col_cos = orientation[:3], orientation[3:]
  to_voxel = lambda lps: labels.world_to_voxel(LPS_TO_RAS @ lps)
  start = to_voxel(position)
  step_c = to_voxel(position + spacing[1] * row_cos) - start
  step_r = to_voxel(position + spacing[0] * col_cos) - start
  corners = np.array([start + r * step_r + c * step_c
                      for r in (0, rows - 1) for c in (0, cols - 1)])
  off = max(np.max(np.abs(corners - np.rint(corners))),
            np.max(np.abs(step_r - np.rint(step_r))) * rows,
            np.max(np.abs(step_c - np.rint(step_c))) * cols)
  if off > _ON_GRID_VOXELS:
    raise ValueError(f"a source frame is off the label map's voxel grid by {off:.2g} voxels")
  corners = np.rint(corners)
  if np.any(corners < 0) or np.any(corners > np.asarray(labels.shape) - 1):
    raise ValueError("a source frame lies outside the label map")
  start, step_r, step_c = np.rint(start).astype(int), np.rint(step_r).astype(int), \
      np.rint(step_c).astype(int)
  index = (start + np.arange(rows)[:, None, None] * step_r
           + np.arange(cols)[None, :, None] * step_c)
  return labels.array[index[..., 0], index[..., 1], index[..., 2], 0]


def dicom_seg_frames(labels: Volume, sources: Sequence[pydicom.Dataset]
                     ) -> tuple[list[pydicom.Dataset], np.ndarray]:
  """Orders the source images and puts the label map into their frames.

  Args:
    labels: the label map ``[i, j, k, 1]`` on the grid the series was read onto (any axis order:
      the mapping goes through world coordinates).
    sources: the series' headers (single-frame images), or one multi-frame image.

  Returns:
    ``(sources, frames)``: single-frame sources sorted along the slice normal (the order the
    reader stacked them) and ``frames [n, rows, cols]`` with ``frames[n]`` the labels at
    ``sources[n]``'s pixels; a multi-frame source's frames in its own frame order.
  """
  if len(sources) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in sources):
    raise ValueError("DICOM-SEG references one multi-frame image or a series of single-frame "
                     "images, not several multi-frame images")
  planes = [_frame_planes(ds) for ds in sources]
  if len(sources) > 1:
    _, orientation, _ = planes[0][0]
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort([float(p[0][0] @ normal) for p in planes], kind="stable")
    sources, planes = [sources[n] for n in order], [planes[n] for n in order]
  frames = [_sample_frame(labels, *plane, int(ds.Rows), int(ds.Columns))
            for ds, ds_planes in zip(sources, planes) for plane in ds_planes]
  return list(sources), np.stack(frames)


def write_dicom_seg(labels: Volume, source_files: Sequence[str], class_names: Sequence[str],
                    path: str, *, segmentation_type: str = "BINARY",
                    algorithm: str = "medjax", description: str = "medjax segmentation") -> None:
  """Writes a label map as a DICOM-SEG (highdicom) that references its source series.

  One segment per foreground class (segment ``n`` = class ``n``, labelled with its name and coded
  as an anatomical structure with the run's class name in a local coding scheme); frames map
  pixel for pixel onto the source images (`dicom_seg_frames`); empty frames are omitted. The
  object carries the source's Patient and General Study modules, as the standard requires.

  Args:
    labels: uint ``[i, j, k, 1]`` on the grid the series was read onto.
    source_files: the series' files.
    class_names: by class index; 0 is background.
    path: the ``.dcm`` to write.
    segmentation_type: ``"BINARY"`` (one bit-packed frame per segment and slice; what viewers
      read today) or ``"LABELMAP"`` (one frame per slice; DICOM 2024, few readers yet).
    algorithm: the algorithm name recorded with each segment.
    description: the SEG's SeriesDescription.

  Raises:
    ValueError: a source image lacks a UID the SEG must reference, or its pixels are not voxel
      centres of ``labels``.
  """
  sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
  for file, ds in zip(source_files, sources):
    # PS3.10 makes the file meta's SOP class and instance those of the dataset; some
    # de-identifiers blank the dataset's copies only.
    meta = getattr(ds, "file_meta", None) or {}
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
      if not str(ds.get(keyword, "")).strip() and str(meta.get(meta_keyword, "")).strip():
        setattr(ds, keyword, meta[meta_keyword].value)
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                           "SeriesInstanceUID") if not str(ds.get(k, "")).strip()]
    if missing:
      raise ValueError(f"{os.path.basename(file)} has no {', '.join(missing)} (blanked by "
                       "de-identification?); a DICOM-SEG must reference them")
    for keyword in _SEG_TYPE2:
      if keyword not in ds:
        setattr(ds, keyword, "")
  sources, frames = dicom_seg_frames(labels, sources)
  try:
    version = importlib.metadata.version("medjax")
  except importlib.metadata.PackageNotFoundError:
    version = "unknown"
  identification = hd.AlgorithmIdentificationSequence(
      name=algorithm[:64], version=version, family=codes.cid7162.ArtificialIntelligence)
  segments = [hd.seg.SegmentDescription(
      segment_number=n, segment_label=name[:64],
      segmented_property_category=codes.SCT.AnatomicalStructure,
      segmented_property_type=hd.sr.CodedConcept(str(n), _PRIVATE_SCHEME, name[:64]),
      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
      algorithm_identification=identification)
      for n, name in enumerate(class_names) if n > 0]
  seg = hd.seg.Segmentation(
      source_images=sources, pixel_array=frames.astype(np.uint8),
      segmentation_type=segmentation_type.upper(), segment_descriptions=segments,
      series_instance_uid=hd.UID(), series_number=_SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
      instance_number=1, manufacturer="medjax", manufacturer_model_name=algorithm[:64],
      software_versions=version, device_serial_number="none", omit_empty_frames=True)
  seg.SeriesDescription = description[:64]
  with atomic_path(path, suffix=".dcm") as tmp:
    seg.save_as(tmp, enforce_file_format=True)
