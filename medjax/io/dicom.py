"""DICOM reading (pydicom): single files, series from folders or a DICOMDIR, enhanced multi-frame.

Geometry follows the standard, not file names: slices are sorted by ImagePositionPatient projected
on the slice normal (row cosine × column cosine), the slice spacing comes from those positions, and
an oblique orientation is kept in ``Volume.direction``. A series with a missing, duplicated or
unevenly spaced slice is an error that says where, unless the caller allows it (then the gaps are
listed in ``metadata["slice_gaps_mm"]``), because a silently wrong spacing corrupts every mm figure
downstream. DICOM's LPS+ frame becomes medjax's RAS+ here, at the edge.

Pixel data goes through pydicom's decoder plugins (pylibjpeg with openjpeg/libjpeg/rle), so JPEG
baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE and deflate all read; a missing decoder is an
error naming the package to install. Long compressed series are decoded in worker processes.

Decoding files into frames is `medjax.io.dicom_frames`; this module stacks them into Volumes.

Privacy: only the de-identified keywords in `SAFE_METADATA` ever leave this module (no names, IDs,
dates or UIDs; the frame of reference only as a digest, see `medjax.io.dicom_frames`), and no DICOM
value is logged.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import logging
import multiprocessing
import os
from typing import Any, Sequence

import numpy as np
import pydicom
import pydicom.errors
import pydicom.fileset
import pydicom.pixels

from medjax.io.dicom_frames import (  # noqa: F401  (SAFE_METADATA: public here too)
  _DEFER_BYTES,
  _NATIVE,
  FRAME_OF_REFERENCE_KEY,
  SAFE_METADATA,
  _dcmread,
  _frames,
  _safe_metadata,
  _Slice,
  _transfer_syntax,
)
from medjax.io.errors import MedjaxIOError
from medjax.io.volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Compressed series with at least this many files are decoded in worker processes.
_PROCESS_MIN_FILES = 8
# Two slice gaps differing by less than this (relative) count as the same spacing.
_GAP_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
  """One series found under a folder or DICOMDIR (for choosing; never logged)."""

  uid: str
  modality: str
  description: str
  files: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Geometry


def _plane_axes(orientation: np.ndarray, path: str) -> np.ndarray:
  """Unit row, column and normal directions (LPS+) as the columns of a 3×3 matrix."""
  row, col = orientation[:3], orientation[3:]
  nrow, ncol = np.linalg.norm(row), np.linalg.norm(col)
  if nrow < 1e-6 or ncol < 1e-6 or abs(np.dot(row, col)) > 1e-3 * nrow * ncol:
    raise MedjaxIOError(path, f"ImageOrientationPatient is not two orthogonal directions: "
                        f"{orientation.tolist()}")
  row, col = row / nrow, col / ncol
  return np.stack([row, col, np.cross(row, col)], axis=1)


def _stack(slices: Sequence[_Slice], sources: Sequence[str], where: str, allow_uneven: bool,
           default_thickness: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                              dict[str, Any]]:
  """Sorts frames along the slice normal; returns (voxels [i,j,k,C], spacing, origin, direction)
  in RAS+, and geometry notes for the metadata."""
  notes: dict[str, Any] = {}
  first = slices[0]
  shapes = {s.pixels.shape for s in slices}
  if len(shapes) > 1:
    raise MedjaxIOError(where, f"slices differ in size/channels: {sorted(shapes)}")
  have_geometry = all(s.position is not None and s.orientation is not None for s in slices)
  if have_geometry:
    axes = _plane_axes(first.orientation, sources[0])
    for s, src in zip(slices, sources):
      if np.max(np.abs(s.orientation - first.orientation)) > 1e-4:
        raise MedjaxIOError(src, "slices of one series have different ImageOrientationPatient")
    normal = axes[:, 2]
    distance = np.array([np.dot(s.position, normal) for s in slices])
    order = np.argsort(distance, kind="stable")
  else:
    notes["geometry"] = "unknown (no ImagePositionPatient/ImageOrientationPatient)"
    axes = np.eye(3)
    distance = None
    order = np.arange(len(slices))
  spacings = {s.pixel_spacing for s in slices}
  if len(spacings) > 1:
    raise MedjaxIOError(where, f"slices differ in PixelSpacing: {sorted(map(str, spacings))}")
  row_spacing, col_spacing = first.pixel_spacing or (1.0, 1.0)
  if first.pixel_spacing is None:
    notes["pixel_spacing"] = "unknown, 1 mm assumed"
  slice_spacing = default_thickness
  if distance is not None and len(slices) > 1:
    d = distance[order]
    gaps = np.diff(d)
    typical = float(np.median(gaps))
    if typical <= 1e-6 or np.any(gaps <= 1e-3 * typical):
      dup = [sources[order[n + 1]] for n in np.flatnonzero(gaps <= max(1e-3 * typical, 1e-6))]
      raise MedjaxIOError(where, f"{len(dup)} slice(s) share a position with another "
                          f"(two acquisitions in one series?), e.g. {os.path.basename(dup[0])}")
    uneven = np.flatnonzero(np.abs(gaps - typical) > _GAP_TOLERANCE * typical)
    if len(uneven):
      described = ", ".join(f"{gaps[n]:.3g} mm after slice {n} ({d[n]:.2f} mm)" for n in uneven[:3])
      missing = int(np.sum(np.round(gaps[uneven] / typical) - 1).clip(0))
      message = (f"uneven slice spacing ({len(uneven)} gap(s) differ from the typical "
                 f"{typical:.4g} mm: {described}; about {missing} slice(s) missing)")
      if not allow_uneven:
        raise MedjaxIOError(where, message + "; pass allow_uneven=True to read anyway")
      log.warning("%s: %s", where, message)
      notes["slice_gaps_mm"] = [float(g) for g in gaps]
    slice_spacing = float((d[-1] - d[0]) / (len(d) - 1))
    # Positions must step along the normal; a sideways drift (gantry tilt) is a sheared grid.
    offsets = np.array([slices[n].position for n in order]) - slices[order[0]].position
    drift = offsets - np.outer(offsets @ axes[:, 2], axes[:, 2])
    if np.max(np.linalg.norm(drift, axis=1)) > 0.05 * min(row_spacing, col_spacing) + 1e-3:
      raise MedjaxIOError(where, "slice positions drift within the slice plane (gantry tilt or "
                          "a sheared stack); a Volume cannot hold a sheared grid")
  origin = slices[order[0]].position if have_geometry else np.zeros(3)
  voxels = _fill(slices, order)
  spacing = np.array([col_spacing, row_spacing, slice_spacing])
  return voxels, spacing, LPS_TO_RAS @ origin, LPS_TO_RAS @ axes, notes


def _fill(slices: Sequence[_Slice], order: np.ndarray) -> np.ndarray:
  """``[i, j, k, C]`` voxels: frame ``order[k]``, rescaled, is plane ``k``.

  Stored as ``[k, j, i, C]`` in memory and returned as a transposed view, so ``i`` varies fastest
  (the layout nibabel gives NIfTI data too). Writing each frame contiguously in place is 4-8×
  faster than a C-ordered ``[i, j, k]`` copy, whose every plane write strides across the volume.
  """
  rows, cols, channels = slices[0].pixels.shape
  rescaled = any(s.rescaled or s.pixels.dtype.kind == "f" for s in slices)
  dtype = np.float32 if rescaled else np.result_type(*{s.pixels.dtype for s in slices})
  voxels = np.empty((len(order), rows, cols, channels), dtype)
  for k, n in enumerate(order):
    frame, plane = slices[n], voxels[k]
    plane[...] = frame.pixels
    if rescaled and frame.slope != 1.0:
      plane *= np.float32(frame.slope)
    if rescaled and frame.intercept != 0.0:
      plane += np.float32(frame.intercept)
  return voxels.transpose(2, 1, 0, 3)


def _default_thickness(ds: pydicom.Dataset, path: str) -> float:
  for keyword in ("SpacingBetweenSlices", "SliceThickness"):
    value = ds.get(keyword)
    try:
      if value is not None and float(value) > 0:
        return float(value)
    except (TypeError, ValueError):
      raise MedjaxIOError(path, f"{keyword} is not numeric") from None
  return 1.0


# ----------------------------------------------------------------------------------------------
# Public readers


def read_dicom_file(path: str | os.PathLike, rescale: bool = True, invert_monochrome1: bool = True,
                    greyscale: bool = False, allow_uneven: bool = False) -> Volume:
  """Reads one DICOM file (single- or multi-frame) as a Volume.

  Args:
    path: the file.
    rescale: apply RescaleSlope/Intercept or the modality LUT (CT in HU, float32).
    invert_monochrome1: make MONOCHROME1 images bright-is-dense like MONOCHROME2.
    greyscale: turn RGB/YBR images into one luminance channel (ITU-R BT.601 weights).
    allow_uneven: read an enhanced multi-frame stack with uneven frame spacing (see module doc).
  """
  path = os.fspath(path)
  ds = _dcmread(path)
  if str(ds.get("SOPClassUID", "")) == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
    raise MedjaxIOError(path, "is a DICOMDIR; use read_dicom_series or read_dicom")
  slices = _frames(ds, path, rescale, invert_monochrome1, greyscale)
  voxels, spacing, origin, direction, notes = _stack(
      slices, [path] * len(slices), path, allow_uneven, _default_thickness(ds, path))
  metadata = {**_safe_metadata(ds), **notes, "frames": len(slices)}
  return Volume(voxels, spacing, origin, direction, modality=str(ds.get("Modality", "")),
                metadata=metadata)


def _files_under(folder: str) -> list[str]:
  paths = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    paths.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
  return paths


def _dicomdir_files(path: str) -> list[str]:
  """The image files a DICOMDIR references (pydicom's FileSet resolves the relative IDs)."""
  try:
    fileset = pydicom.fileset.FileSet(pydicom.dcmread(path))
    files = [os.fspath(instance.path) for instance in fileset]
  except Exception as e:  # noqa: BLE001
    raise MedjaxIOError(path, f"unreadable DICOMDIR ({type(e).__name__}: {e})") from e
  if not files:
    raise MedjaxIOError(path, "the DICOMDIR references no files")
  return files


def _scan(path: str) -> dict[str, list[tuple[str, pydicom.Dataset]]]:
  """Headers of the image files under a folder or DICOMDIR, grouped by SeriesInstanceUID.

  Each file is parsed once: large values (the pixels) are deferred, read later from the file.
  Files that are not DICOM, or DICOM without pixels (DICOMDIR, reports), are skipped; a DICOM
  file whose header is damaged is an error naming it. Serial on
  purpose: parsing holds the GIL, and a thread pool measured slower than one thread.
  """
  if os.path.isdir(path):
    candidates = _files_under(path)
  elif os.path.isfile(path):
    candidates = _dicomdir_files(path)
  else:
    raise MedjaxIOError(path, "no such file or folder")
  series: dict[str, list[tuple[str, pydicom.Dataset]]] = {}
  skipped = 0
  for file in candidates:
    try:
      ds = pydicom.dcmread(file, defer_size=_DEFER_BYTES)
    except pydicom.errors.InvalidDicomError:  # no DICM preamble: some other kind of file
      ds = None
    except Exception as e:  # noqa: BLE001 - a DICOM file that is damaged must not vanish
      raise MedjaxIOError(file, f"unreadable DICOM header ({type(e).__name__}: {e})") from e
    if ds is None or str(ds.get("SOPClassUID", "")) == _DICOMDIR_CLASS or "Rows" not in ds:
      skipped += 1
      continue
    series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((file, ds))
  if skipped:
    log.info("%s: skipped %d file(s) that are not DICOM images", path, skipped)
  return series


def list_dicom_series(path: str | os.PathLike) -> list[SeriesInfo]:
  """Every image series under a folder (recursively) or referenced by a DICOMDIR."""
  path = os.fspath(path)
  return [SeriesInfo(uid, str(items[0][1].get("Modality", "")),
                     str(items[0][1].get("SeriesDescription", "")),
                     tuple(file for file, _ in items))
          for uid, items in _scan(path).items()]


def _decode_file(file: str, options: tuple[bool, bool, bool]) -> list[_Slice]:
  """One file's frames; a top-level function so worker processes can run it."""
  return _frames(_dcmread(file), file, *options)


_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_workers = 0


def _process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """A decoding pool kept across reads (start-up costs about as much as decoding 20 slices).

  Started by a fork server, never by a plain fork of this process: the caller may hold JAX's
  threads, which a fork would copy in a broken state.
  """
  global _pool, _pool_workers
  if _pool is None or _pool_workers != workers:
    if _pool is not None:
      _pool.shutdown(cancel_futures=True)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
      context.set_forkserver_preload([__name__])
    _pool, _pool_workers = concurrent.futures.ProcessPoolExecutor(workers, context), workers
  return _pool


def _decode_series(files: Sequence[str], datasets: Sequence[pydicom.Dataset | None],
                   options: tuple[bool, bool, bool], workers: int, where: str
                   ) -> list[list[_Slice]]:
  """Every file's frames, in worker processes for long compressed series, else in this one."""
  syntax = _transfer_syntax(datasets[0]) if datasets[0] is not None else ""
  if workers > 1 and len(files) >= _PROCESS_MIN_FILES and syntax and syntax not in _NATIVE:
    pool = _process_pool(workers)
    chunk = max(1, len(files) // (4 * workers))
    try:
      return list(pool.map(_decode_file, files, [options] * len(files), chunksize=chunk))
    except concurrent.futures.process.BrokenProcessPool:
      # Workers cannot start where the main module cannot be re-imported (a script piped on
      # stdin, an unguarded entry point); decoding here is slower but gives the same volume.
      global _pool
      _pool = None
      log.warning("%s: decoding processes failed; decoding in this process instead", where)
  return [_frames(ds if ds is not None else _dcmread(file), file, *options)
          for file, ds in zip(files, datasets)]


def read_dicom_series(path: str | os.PathLike | Sequence[str], series_uid: str | None = None,
                      rescale: bool = True, invert_monochrome1: bool = True,
                      greyscale: bool = False, allow_uneven: bool = False,
                      workers: int | None = None) -> Volume:
  """Reads one series from a folder, a DICOMDIR, or an explicit list of files, as a Volume.

  Args:
    path: a folder (searched recursively), a DICOMDIR file, or the files of one series.
    series_uid: which series when there are several (see `list_dicom_series`); required then.
    rescale, invert_monochrome1, greyscale: as in `read_dicom_file`.
    allow_uneven: read a series with missing or unevenly spaced slices instead of raising; the
      spacing is then the mean and ``metadata["slice_gaps_mm"]`` lists every gap.
    workers: processes that decode a compressed series of 8 files or more (pydicom's decoders
      hold the GIL, so threads would not run them in parallel); default: the CPU count; 1 decodes
      in this process. Uncompressed pixels are a memory copy and always stay in this process.
      Like every multiprocessing user, a script calling this must guard its entry point with
      ``if __name__ == "__main__":``.
  """
  if isinstance(path, (str, os.PathLike)):
    where = os.fspath(path)
    found = _scan(where)
    if not found:
      raise MedjaxIOError(where, "no DICOM image files found")
    if series_uid is not None:
      found = {uid: items for uid, items in found.items() if uid == series_uid}
      if not found:
        raise MedjaxIOError(where, f"no series with SeriesInstanceUID {series_uid}")
    if len(found) > 1:
      listing = "; ".join(f"{uid} ({items[0][1].get('Modality', '')}, {len(items)} files)"
                          for uid, items in found.items())
      raise MedjaxIOError(where, f"{len(found)} series found, pass series_uid= one of: {listing}")
    files, datasets = map(list, zip(*next(iter(found.values()))))
  else:
    files = [os.fspath(p) for p in path]
    if not files:
      raise ValueError("read_dicom_series got an empty list of files")
    where = os.path.dirname(files[0]) or "."
    datasets = [_dcmread(files[0])] + [None] * (len(files) - 1)
  workers = (os.cpu_count() or 1) if workers is None else workers
  options = (rescale, invert_monochrome1, greyscale)
  decoded = _decode_series(files, datasets, options, workers, where)
  slices, sources = [], []
  for file, frames in zip(files, decoded):
    slices.extend(frames)
    sources.extend([file] * len(frames))
  first = datasets[0]
  voxels, spacing, origin, direction, notes = _stack(
      slices, sources, where, allow_uneven, _default_thickness(first, files[0]))
  metadata = {**_safe_metadata(first), **notes, "files": len(files)}
  return Volume(voxels, spacing, origin, direction, modality=str(first.get("Modality", "")),
                metadata=metadata)


def read_dicom(path: str | os.PathLike, **kwargs) -> Volume:
  """A folder or DICOMDIR → `read_dicom_series`; any other file → `read_dicom_file`."""
  path = os.fspath(path)
  if os.path.isdir(path) or _is_dicomdir(path):
    return read_dicom_series(path, **kwargs)
  return read_dicom_file(path, **kwargs)


def _is_dicomdir(path: str) -> bool:
  ds = _dcmread(path, stop_before_pixels=True)
  return str(ds.get("SOPClassUID", "")) == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds
