"""What `medjax.infer.predict` reads: inputs found under a path, read into Volumes, and named.

A folder's DICOM series (grouped by SeriesInstanceUID, wherever their files lie) are one input
each, every NIfTI/PNG/JPEG file another (`find_inputs`); `read_input` reads one (and is where
every input's voxels are checked to be finite: `NONFINITE`); `output_stem`
names its output files; `Scrubber` removes the inputs' patient-identifying header values from a
text (an error message that quoted one).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import numpy as np
import pydicom
import pydicom.errors
from PIL import Image, ImageOps

from medjax.io.dicom import read_dicom_series
from medjax.io.errors import MedjaxIOError
from medjax.io.nifti import NIFTI_SUFFIXES, read_nifti
from medjax.io.volume import Volume, fill_nonfinite, nonfinite_problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# What `read_input` does with NaN/±inf voxels: "refuse" the input (the default: a network answers
# NaN input with a confident-looking, meaningless prediction), or "fill" them from the finite
# range of their channel (NaN and -inf → its minimum, +inf → its maximum) and say so.
NONFINITE = ("refuse", "fill")
# Files with these names must be DICOM; other unknown files in a folder are skipped if they are not.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# DICOM classes that hold pixels but are not images to predict on (earlier outputs, say).
_SKIP_SOP_CLASSES = frozenset({
    "1.2.840.10008.1.3.10",  # DICOMDIR (its files are in the tree anyway)
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
})
# Header values that identify a patient: scrubbed from every error text and warning predict
# writes, in case a library quoted one.
_IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate",
                "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
                "PatientTelephoneNumbers", "IssuerOfPatientID", "AccessionNumber",
                "ReferringPhysicianName", "InstitutionName", "StudyDate", "StudyID")


@dataclasses.dataclass(frozen=True)
class Input:
  """One thing to predict on.

  Attributes:
    kind: ``"dicom"`` (a series, or one file), ``"nifti"`` or ``"image"`` (PNG/JPEG).
    name: its path relative to ``--input`` (a series: its folder, ``#n`` when a folder holds
      several series, numbered in file-name order); what tables and messages call it.
    files: the files (a DICOM series: all of its files; else the one file).
  """

  kind: str
  name: str
  files: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Failure:
  """An input that was skipped (or only partly written), and why."""

  input: str
  problem: str


def _walk(folder: str, exclude: str | None) -> list[str]:
  paths = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and os.path.join(root, d) != exclude)
    paths.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
  return paths


def _dicom_header(path: str, required: bool) -> pydicom.Dataset | None:
  """The header of an image DICOM file; None for a file that is not one (when not ``required``).

  Raises:
    MedjaxIOError: a DICOM file whose header is damaged, or a required one that is not DICOM.
  """
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=required)
  except pydicom.errors.InvalidDicomError:  # no DICM preamble: some other kind of file
    return None
  except Exception as e:  # noqa: BLE001 - truncated headers raise many types
    raise MedjaxIOError(path, f"unreadable DICOM header ({type(e).__name__})") from e
  if "SOPClassUID" not in ds and "Rows" not in ds:
    if required:
      raise MedjaxIOError(path, "not a DICOM file (no DICM preamble, no SOP class, no image)")
    return None
  return ds


def find_inputs(path: str, exclude: str | None = None) -> tuple[list[Input], list[Failure], int]:
  """The inputs at ``path`` (a file or a folder, searched recursively).

  Args:
    path: see the module docstring.
    exclude: a folder not to search (the output folder, when it lies inside ``path``).

  Returns:
    ``(inputs, failures, skipped)``: inputs sorted by name; files that claim to be an input but
    cannot be (a damaged DICOM header, a ``.dcm`` that is not DICOM); the number of other files
    ignored (neither DICOM images, NIfTI, PNG nor JPEG).
  """
  path = os.path.abspath(path)
  if os.path.isfile(path):
    low = path.lower()
    kind = ("nifti" if low.endswith(NIFTI_SUFFIXES) else
            "image" if low.endswith(IMAGE_SUFFIXES) else "dicom")
    if kind == "dicom":
      try:
        _dicom_header(path, required=True)
      except MedjaxIOError as e:
        return [], [Failure(os.path.basename(path), e.cause)], 0
    return [Input(kind, os.path.basename(path), (path,))], [], 0
  if not os.path.isdir(path):
    raise MedjaxIOError(path, "no such file or folder")
  inputs, failures, skipped = [], [], 0
  series: dict[tuple[str, str], list[tuple[str, str]]] = collections.defaultdict(list)
  for file in _walk(path, exclude):
    rel = os.path.relpath(file, path)
    low = file.lower()
    if low.endswith(NIFTI_SUFFIXES):
      inputs.append(Input("nifti", rel, (file,)))
      continue
    if low.endswith(IMAGE_SUFFIXES):
      inputs.append(Input("image", rel, (file,)))
      continue
    try:
      ds = _dicom_header(file, required=low.endswith(DICOM_SUFFIXES))
    except MedjaxIOError as e:
      failures.append(Failure(rel, e.cause))
      continue
    if ds is None or "Rows" not in ds or str(ds.get("SOPClassUID", "")) in _SKIP_SOP_CLASSES:
      skipped += 1
      continue
    # Files without a series UID are grouped by folder: the reader then says if they don't fit.
    uid = str(ds.get("SeriesInstanceUID", ""))
    series[(uid, os.path.dirname(file) if not uid else "")].append((rel, file))
  by_folder: dict[str, list[list[tuple[str, str]]]] = collections.defaultdict(list)
  for members in series.values():
    members.sort()
    folder = os.path.commonpath([os.path.dirname(rel) or "." for rel, _ in members])
    by_folder[folder].append(members)
  for folder, groups in by_folder.items():
    groups.sort()
    name = os.path.basename(path) if folder in ("", ".") else folder
    for n, members in enumerate(groups, 1):
      label = f"{name}#{n}" if len(groups) > 1 else name
      inputs.append(Input("dicom", label, tuple(file for _, file in members)))
  inputs.sort(key=lambda i: i.name)
  return inputs, failures, skipped


def read_picture(path: str) -> Volume:
  """A PNG/JPEG as a Volume ``[i, j, 1, C]`` (``i`` along a row, as DICOM), 1 mm pixels.

  8-bit greyscale stays uint8 and 16-bit stays uint16; palette, alpha and CMYK images become RGB;
  the EXIF orientation is applied (cameras and phones store it that way).
  """
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      image.load()  # decodes now: a truncated file fails here, not later
      if image.mode in ("1", "LA", "La"):
        image = image.convert("L")
      elif image.mode not in ("L", "I;16", "I", "F", "RGB"):
        image = image.convert("RGB")
      array = np.asarray(image)
  except Exception as e:  # noqa: BLE001 - Pillow raises many types on junk
    raise MedjaxIOError(path, f"unreadable image ({type(e).__name__}: {e})") from e
  if array.ndim == 2:
    array = array[..., None]
  voxels = np.ascontiguousarray(array.transpose(1, 0, 2)[:, :, None, :])
  return Volume(voxels, np.ones(3), np.zeros(3), np.eye(3),
                metadata={"format": os.path.splitext(path)[1].lstrip(".").lower()})


def read_input(item: Input, nonfinite: str = "refuse") -> tuple[Volume, str | None]:
  """The input's voxels on its own grid: NIfTI in the file's axis order (no reorientation).

  Args:
    item: the input.
    nonfinite: one of `NONFINITE`.

  Returns:
    ``(volume, note)``: ``note`` says what was repaired (``nonfinite="fill"``), else None.

  Raises:
    MedjaxIOError: the input is unreadable, or holds NaN/±inf voxels and ``nonfinite`` is
      ``"refuse"`` (or a channel has no finite voxel at all).
  """
  if nonfinite not in NONFINITE:
    raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
  if item.kind == "nifti":
    volume = read_nifti(item.files[0], canonical=False)
  elif item.kind == "image":
    volume = read_picture(item.files[0])
  else:
    volume = read_dicom_series(list(item.files))
  # A series is named by its folder (the common one of its files), a file by itself.
  where = item.files[0] if len(item.files) == 1 else os.path.commonpath(item.files)
  if nonfinite == "refuse":
    problem = nonfinite_problem(volume.array)
    if problem:
      raise MedjaxIOError(where, f"{problem} (--nonfinite=fill repairs them)")
    return volume, None
  try:
    return fill_nonfinite(volume)
  except ValueError as e:
    raise MedjaxIOError(where, str(e)) from None


class Scrubber:
  """Removes the inputs' patient-identifying header values (`_IDENTIFYING`) from a text."""

  def __init__(self, inputs: Sequence[Input]):
    values = set()
    for item in inputs:
      if item.kind != "dicom":
        continue
      try:  # one file per series: the patient does not change within a series
        ds = pydicom.dcmread(item.files[0], stop_before_pixels=True, force=True)
      except Exception:  # noqa: BLE001 - the read itself will report it
        continue
      for keyword in _IDENTIFYING:
        value = ds.get(keyword)
        for v in (value if isinstance(value, pydicom.multival.MultiValue) else [value]):
          text = str(v or "").strip()
          if len(text) >= 3:
            values.update({text, text.replace("^", " ").strip()})
    self.values = sorted(values, key=len, reverse=True)

  def __call__(self, text: str) -> str:
    for value in self.values:
      text = text.replace(value, "[removed]")
    return text


def output_stem(name: str, taken: set[str]) -> str:
  """A unique output file stem for an input name (``a/b.nii.gz`` → ``a_b``)."""
  low = name.lower()
  for suffix in NIFTI_SUFFIXES[::-1] + IMAGE_SUFFIXES + DICOM_SUFFIXES:
    if low.endswith(suffix):
      name = name[:-len(suffix)]
      break
  stem = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in name).strip("._") or "input"
  unique, n = stem, 1
  while unique in taken:
    n += 1
    unique = f"{stem}_{n}"
  taken.add(unique)
  return unique
