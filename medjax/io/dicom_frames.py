"""DICOM files to frames: reading headers, decoding pixels (pydicom's plugins), rescaling and
photometric fixes, and each frame's plane geometry, for `medjax.io.dicom` to stack into Volumes.

Privacy: `SAFE_METADATA` lists the only keywords `_safe_metadata` copies out of a header; the
FrameOfReferenceUID leaves only as a digest (`FRAME_OF_REFERENCE_KEY`), enough to tell whether two
series share a patient frame without carrying the UID itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
import pydicom.fileset
import pydicom.pixels
from pydicom.uid import UID

from medjax.io.errors import MedjaxIOError

# Acquisition facts that identify nobody (DICOM PS3.15 Basic Profile keeps them); free text such as
# SeriesDescription is left out because sites put names in it.
SAFE_METADATA = (
    "Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "ImageType",
    "PhotometricInterpretation", "BitsStored", "SliceThickness", "KVP", "ConvolutionKernel",
    "RescaleType", "WindowCenter", "WindowWidth", "MagneticFieldStrength", "RepetitionTime",
    "EchoTime", "InversionTime", "FlipAngle", "ScanningSequence", "SequenceVariant",
)

# Metadata key of the FrameOfReferenceUID's digest (series with equal digests share one frame).
FRAME_OF_REFERENCE_KEY = "FrameOfReferenceDigest"

# Transfer syntax → the packages that decode it (for the "missing decoder" message).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}
# Transfer syntaxes whose pixels are stored raw: decoding them is a memory copy.
_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                     "1.2.840.10008.1.2.1.99"})
# Values longer than this (the pixels) are read from the file only when used.
_DEFER_BYTES = 16384
# Largest decoded image accepted: a corrupt Rows/Columns/NumberOfFrames must not allocate 100 GB.
_MAX_PIXELS = 2**31
_BT601 = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class _Slice:
  """The decoded pixels and plane geometry of one frame (LPS+)."""

  pixels: np.ndarray  # [rows, cols, C], stored values (photometric fixes done)
  position: np.ndarray | None  # ImagePositionPatient, mm
  orientation: np.ndarray | None  # ImageOrientationPatient: row cosine, column cosine
  pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
  # Applied while stacking, so the float32 copy is made once, in its final place.
  slope: float = 1.0
  intercept: float = 0.0
  rescaled: bool = False  # the output of this frame is in rescaled (float32) units


def _dcmread(path: str, stop_before_pixels: bool = False) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
  except pydicom.errors.InvalidDicomError:
    # Files without the 128-byte preamble are legal in the wild; a second try without the check.
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on junk; all mean "not DICOM"
      raise MedjaxIOError(path, f"not a DICOM file ({type(e).__name__}: {e})") from e
    if "SOPClassUID" not in ds and "PixelData" not in ds:
      raise MedjaxIOError(path, "not a DICOM file (no DICM preamble, no SOP class, no pixels)")
    return ds
  except IsADirectoryError as e:
    raise MedjaxIOError(path, "is a folder; use read_dicom_series") from e
  except FileNotFoundError as e:
    raise MedjaxIOError(path, "no such file") from e
  except Exception as e:  # noqa: BLE001 - truncated/corrupt headers surface as many types
    raise MedjaxIOError(path, f"unreadable DICOM header ({type(e).__name__}: {e})") from e


def _floats(value: Any, n: int, path: str, keyword: str) -> np.ndarray | None:
  if value is None:
    return None
  try:
    out = np.asarray([float(v) for v in value], np.float64)
  except (TypeError, ValueError) as e:
    raise MedjaxIOError(path, f"{keyword} is not numeric") from e
  if out.shape != (n,) or not np.all(np.isfinite(out)):
    raise MedjaxIOError(path, f"{keyword} must hold {n} finite numbers, got {len(out)}")
  return out


def _transfer_syntax(ds: pydicom.Dataset) -> str:
  meta = getattr(ds, "file_meta", None)
  return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _decode(ds: pydicom.Dataset, path: str) -> np.ndarray:
  """All frames as ``[frames, rows, cols, samples]`` exactly as pydicom decodes them."""
  if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
    raise MedjaxIOError(path, "no pixel data (not an image object)")
  try:
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
  except (AttributeError, TypeError, ValueError) as e:
    raise MedjaxIOError(path, f"bad image dimensions ({type(e).__name__}: {e})") from e
  if min(rows, cols, frames, samples) <= 0 or rows * cols * frames * samples > _MAX_PIXELS:
    raise MedjaxIOError(path, f"implausible image size {frames}×{rows}×{cols}×{samples}")
  try:
    pixels = _native_pixels(ds, frames * rows * cols)
    if pixels is not None:
      pixels = pixels.reshape((frames, rows, cols) if frames > 1 else (rows, cols))
    else:
      pixels = ds.pixel_array
  except (NotImplementedError, RuntimeError) as e:
    syntax = _transfer_syntax(ds)
    if "missing" in str(e).lower() or "plugin" in str(e).lower() or "no pixel data" in str(e):
      name = UID(syntax).name if syntax else "unknown"
      package = _DECODER_PACKAGES.get(syntax, "pylibjpeg with its openjpeg/libjpeg plugins")
      raise MedjaxIOError(path, f"no decoder for transfer syntax {name} ({syntax}); "
                          f"install: pip install {package}") from e
    raise MedjaxIOError(path, f"pixel data could not be decoded ({type(e).__name__}: {e})") from e
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException as e:  # noqa: BLE001 - corrupt streams raise anything from the decoders,
    # even pyo3's PanicException (a BaseException) from the Rust RLE decoder.
    raise MedjaxIOError(path, f"pixel data could not be decoded ({type(e).__name__}: {e})") from e
  pixels = np.asarray(pixels)
  if frames == 1:
    pixels = pixels[None]
  if samples == 1:
    pixels = pixels[..., None]
  if pixels.shape != (frames, rows, cols, samples):
    raise MedjaxIOError(path, f"decoded pixels have shape {pixels.shape}, header says "
                        f"{(frames, rows, cols, samples)}")
  return pixels


def _native_pixels(ds: pydicom.Dataset, count: int) -> np.ndarray | None:
  """Uncompressed little-endian pixels straight from the bytes, in the cases where pydicom's
  decoder would return exactly those values (all bits used, one sample); else None.

  pydicom's general pipeline costs about as much as parsing the file; most CT/MR is this case.
  """
  if _transfer_syntax(ds) not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
    return None
  bits = ds.get("BitsAllocated")
  if (bits not in (8, 16, 32) or ds.get("BitsStored") != bits or "PixelData" not in ds
      or int(ds.get("SamplesPerPixel", 1) or 1) != 1
      or ds.get("PixelRepresentation") not in (0, 1)):
    return None
  dtype = np.dtype(f"<{'i' if ds.PixelRepresentation == 1 else 'u'}{bits // 8}")
  data = ds.PixelData
  if len(data) < count * dtype.itemsize:
    return None  # pydicom's decoder explains the shortfall
  return np.frombuffer(data, dtype, count=count).astype(dtype.newbyteorder("="), copy=False)


def _rescale(pixels: np.ndarray, ds: pydicom.Dataset, path: str,
             transform: pydicom.Dataset | None) -> tuple[np.ndarray, float, float, bool]:
  """RescaleSlope/Intercept of a frame (CT in HU); a modality LUT is applied here instead.

  Returns (pixels, slope, intercept, rescaled): the linear part is left to `_stack`.
  """
  source = transform if transform is not None else ds
  if "ModalityLUTSequence" in source:
    try:
      return (np.asarray(pydicom.pixels.apply_modality_lut(pixels, source), np.float32),
              1.0, 0.0, True)
    except Exception as e:  # noqa: BLE001
      raise MedjaxIOError(path, f"bad modality LUT ({type(e).__name__}: {e})") from e
  slope, intercept = source.get("RescaleSlope"), source.get("RescaleIntercept")
  try:
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
  except (TypeError, ValueError) as e:
    raise MedjaxIOError(path, "RescaleSlope/RescaleIntercept is not numeric") from e
  if not (np.isfinite(slope) and np.isfinite(intercept)):
    raise MedjaxIOError(path, "RescaleSlope/RescaleIntercept is not finite")
  rescaled = slope != 1.0 or intercept != 0.0 or ds.get("Modality") == "CT"
  return pixels, slope, intercept, rescaled


def _photometric(pixels: np.ndarray, ds: pydicom.Dataset, path: str, invert_monochrome1: bool,
                 greyscale: bool) -> np.ndarray:
  """MONOCHROME1 → MONOCHROME2 (bright = dense), palette → RGB, RGB → grey when asked."""
  interpretation = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
  if interpretation == "MONOCHROME1" and invert_monochrome1:
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
      pixels = (-1 - pixels.astype(np.int64)).astype(pixels.dtype)
    else:
      pixels = ((1 << bits) - 1 - pixels.astype(np.int64)).astype(pixels.dtype)
  elif interpretation == "PALETTE COLOR":
    try:
      pixels = np.asarray(pydicom.pixels.apply_color_lut(pixels[..., 0], ds))
    except Exception as e:  # noqa: BLE001
      raise MedjaxIOError(path, f"bad palette colour LUT ({type(e).__name__}: {e})") from e
  if greyscale and pixels.shape[-1] == 3:
    pixels = (pixels.astype(np.float32) @ _BT601)[..., None]
  return pixels


def _safe_metadata(ds: pydicom.Dataset) -> dict[str, Any]:
  """The `SAFE_METADATA` fields present in ``ds``, as plain JSON-able values, and the digest of
  its FrameOfReferenceUID (`FRAME_OF_REFERENCE_KEY`)."""
  out: dict[str, Any] = {}
  for keyword in SAFE_METADATA:
    value = ds.get(keyword)
    if value is None or value == "":
      continue
    if isinstance(value, pydicom.multival.MultiValue):
      value = [_plain(v) for v in value]
    else:
      value = _plain(value)
    out[keyword] = value
  syntax = _transfer_syntax(ds)
  if syntax:
    out["TransferSyntax"] = UID(syntax).name
  frame = str(ds.get("FrameOfReferenceUID", "")).strip()
  if frame:
    out[FRAME_OF_REFERENCE_KEY] = hashlib.sha256(frame.encode()).hexdigest()[:16]
  return out


def _plain(value: Any) -> Any:
  if isinstance(value, (int, float)):
    return float(value) if isinstance(value, float) else int(value)
  try:
    return float(value)
  except (TypeError, ValueError):
    return str(value)


def _functional(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
  """An enhanced multi-frame functional group item: per-frame first, then shared."""
  for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                        ("SharedFunctionalGroupsSequence", 0)):
    items = ds.get(groups)
    if items and len(items) > index and sequence in items[index] and items[index][sequence]:
      return items[index][sequence][0]
  return None


def _frames(ds: pydicom.Dataset, path: str, rescale: bool, invert_monochrome1: bool,
            greyscale: bool) -> list[_Slice]:
  """Decodes a file into one `_Slice` per frame, with per-frame geometry where the file has it."""
  pixels = _decode(ds, path)
  enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
  slices = []
  for f in range(pixels.shape[0]):
    frame = pixels[f]
    if enhanced:
      plane = _functional(ds, f, "PlanePositionSequence")
      orient = _functional(ds, f, "PlaneOrientationSequence")
      measures = _functional(ds, f, "PixelMeasuresSequence")
      transform = _functional(ds, f, "PixelValueTransformationSequence")
    else:
      plane = orient = measures = ds
      transform = None
    frame = _photometric(frame, ds, path, invert_monochrome1, greyscale)
    slope, intercept, rescaled = 1.0, 0.0, False
    if rescale:
      frame, slope, intercept, rescaled = _rescale(frame, ds, path, transform)
    position = _floats(plane and plane.get("ImagePositionPatient"), 3, path,
                       "ImagePositionPatient")
    orientation = _floats(orient and orient.get("ImageOrientationPatient"), 6, path,
                          "ImageOrientationPatient")
    spacing = _floats(measures and measures.get("PixelSpacing"), 2, path, "PixelSpacing")
    if spacing is None and "ImagerPixelSpacing" in ds:  # projection radiographs
      spacing = _floats(ds.ImagerPixelSpacing, 2, path, "ImagerPixelSpacing")
    if spacing is not None and np.any(spacing <= 0):
      raise MedjaxIOError(path, f"PixelSpacing must be positive, got {spacing.tolist()}")
    slices.append(_Slice(frame, position, orientation,
                         None if spacing is None else (float(spacing[0]), float(spacing[1])),
                         slope, intercept, rescaled))
  return slices
