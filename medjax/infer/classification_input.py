"""A classifier's input from any image: what the MedMNIST files hold, made from a Volume.

`classification_input` turns a DICOM/NIfTI/PNG volume into uint8 ``[H, W, C]`` (2-D) or
``[D, H, W, C]`` (3-D) at the run's size; `intensity_op` maps its intensities onto 0..255.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from medjax.data import transforms
from medjax.io.volume import Volume

# CT inputs to a classifier: HU through this window onto 0..255 (abdominal soft tissue, what the
# CT sets of MedMNIST show), unless --intensity says otherwise.
CT_WINDOW = "soft_tissue"


def intensity_op(spec: str, volume: Volume) -> Callable[[np.ndarray], np.ndarray]:
  """The map of ``volume``'s intensities onto MedMNIST's 0..255 (float32 out, not yet rounded).

  Args:
    spec: ``"auto"``: uint8 data kept as is, CT (DICOM modality CT, in HU) through the `CT_WINDOW`
      window, anything else (MR, 16-bit radiographs, float NIfTI) its own 0.5–99.5 percentile
      range stretched onto 0..255 (robust min-max: a burned-in marker or a hot voxel does not
      flatten the rest); ``"keep"``: values already 0..255; ``"percentile"``: the percentile
      stretch; a CT window preset of `transforms.WINDOW_PRESETS` or ``"level,width"`` in HU.
    volume: the input, for its dtype and modality.
  """
  if spec == "auto":
    if volume.array.dtype == np.uint8:
      spec = "keep"
    elif volume.modality.upper() == "CT":
      spec = CT_WINDOW
    else:
      spec = "percentile"
  if spec == "keep":
    return lambda x: np.asarray(x, np.float32)
  if spec == "percentile":
    op = transforms.PercentileClip(0.5, 99.5, rescale=True)
    return lambda x: op.map({"image": x})["image"] * np.float32(255.0)
  window = _window(spec)
  return lambda x: window.map({"image": x})["image"]


def _window(spec: str) -> transforms.Window:
  """A CT window onto 0..255 from a preset name or ``"level,width"``."""
  if spec in transforms.WINDOW_PRESETS:
    return transforms.Window(preset=spec, out_range=(0.0, 255.0))
  try:
    level, width = (float(v) for v in spec.split(","))
    return transforms.Window(level=level, width=width, out_range=(0.0, 255.0))
  except ValueError:
    raise ValueError(f"intensity {spec!r}: expected auto, keep, percentile, a window preset "
                     f"({', '.join(sorted(transforms.WINDOW_PRESETS))}) or level,width (HU, "
                     "width > 0)") from None


def check_intensity(spec: str) -> None:
  """Raises ValueError for an ``intensity`` that `intensity_op` would not understand."""
  if spec not in ("auto", "keep", "percentile"):
    _window(spec)


def _match_channels(image: np.ndarray, channels: int) -> np.ndarray:
  c = image.shape[-1]
  if c == channels:
    return image
  if channels == 1 and c == 3:
    return transforms.Greyscale().map({"image": image})["image"]
  if channels == 3 and c == 1:
    return np.repeat(image, 3, axis=-1)
  raise ValueError(f"the input has {c} channels; the run takes {channels} "
                   "(1 grey or 3 RGB channels can be converted)")


def _resize_2d(image: np.ndarray, size: int) -> np.ndarray:
  """``[H, W, C]`` → centre square (short edge) → ``[size, size, C]``, bicubic with antialiasing
  (Pillow's, on float32 so nothing is quantised before the end)."""
  h, w = image.shape[:2]
  edge = min(h, w)
  top, left = (h - edge) // 2, (w - edge) // 2
  square = image[top:top + edge, left:left + edge]
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(square[..., c], np.float32))
                              .resize((size, size), Image.Resampling.BICUBIC))
                   for c in range(square.shape[-1])], axis=-1)


def _resize_3d(volume: np.ndarray, size: int) -> np.ndarray:
  """``[D, H, W, C]`` → ``[size]*3 + [C]``: linear, after a Gaussian low-pass on each axis that
  shrinks (sigma = (factor - 1) / 2, as scikit-image's ``anti_aliasing``) so no detail aliases."""
  shape = np.asarray(volume.shape[:3], np.float64)
  factors = shape / size
  sigma = np.maximum(0.0, (factors - 1) / 2)
  out = []
  for c in range(volume.shape[-1]):
    x = volume[..., c].astype(np.float32)
    if np.any(sigma > 0):
      x = ndimage.gaussian_filter(x, sigma, mode="nearest")
    out.append(ndimage.zoom(x, size / shape, order=1, mode="nearest", grid_mode=True))
  return np.stack(out, axis=-1)


def classification_input(volume: Volume, size: int, ndim: int, channels: int,
                         intensity: str = "auto") -> np.ndarray:
  """One input as a MedMNIST record image (see the module docstring).

  Args:
    volume: the input as read (`read_input`).
    size: the run's ``config.data.size``.
    ndim: 2 (images) or 3 (volumes), the MedMNIST set's.
    channels: 1 (grey) or 3 (RGB), the MedMNIST set's.
    intensity: see `intensity_op`.

  Returns:
    uint8 ``[size, size, C]`` (2-D; rows top to bottom as a viewer shows the input) or
    ``[size, size, size, C]`` (3-D; ``[D, H, W]`` = inferior→superior axial slices, each with
    anterior at the top and the patient's right on the left, the radiological view).

  Raises:
    ValueError: the input's dimensionality or channels do not fit the run.
  """
  if ndim == 2:
    if volume.shape[2] != 1:
      raise ValueError(f"the run classifies 2-D images; this input is a volume of "
                       f"{volume.shape[2]} slices")
    # Volume axes i (along a row), j (down the rows): the picture is [j, i].
    image = volume.array[:, :, 0, :].transpose(1, 0, 2)
  elif ndim == 3:
    if min(volume.shape) < 2:
      raise ValueError(f"the run classifies volumes; this input has shape {volume.shape}")
    # LPS axis order (i → patient's left, j → posterior, k → superior), stacked as [k, j, i].
    lps = volume.reoriented(np.diag([-1.0, -1.0, 1.0, 1.0]))
    image = lps.array.transpose(2, 1, 0, 3)
  else:
    raise ValueError(f"MedMNIST sets are 2-D or 3-D, not {ndim}-D")
  image = intensity_op(intensity, volume)(_match_channels(image, channels).astype(np.float32))
  image = _resize_2d(image, size) if ndim == 2 else _resize_3d(image, size)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)
