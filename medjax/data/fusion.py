"""Pixel-level fusion of two co-registered images: the classical baselines of the fusion literature.

Methods (`METHODS`), each on two float ``[H, W]`` grey images in 0..255:

* ``mean``, ``max``: the pixel-wise mean and maximum (trivial references).
* ``pyramid``: Laplacian-pyramid fusion (Burt & Adelson 1983; Burt & Kolczynski 1993): each image
  split into band-pass levels and a low-pass top; detail levels fused by the larger absolute
  coefficient, the top averaged; the fused pyramid collapsed.
* ``wavelet``: discrete-wavelet fusion (Li, Manjunath & Mitra 1995) with PyWavelets, same rules:
  detail sub-bands by the larger absolute coefficient, the approximation averaged.

`fuse` takes the images as read (uint8, grey ``[H, W]`` or RGB ``[H, W, 3]``). A colour source
(PET, SPECT) is fused through its luminance, as the papers do: its Y (YCbCr, BT.601 full range)
is fused with the other image and its chroma (Cb, Cr) put back. The result is clipped to 0..255
as float; `to_uint8` rounds it to what is written.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pywt
from scipy import ndimage

# Burt & Adelson's 5-tap generating kernel (a = 0.375): the classic pyramid's smoothing filter.
_BURT = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0

# JPEG / BT.601 full-range RGB -> YCbCr (what OpenCV's COLOR_RGB2YCrCb and Pillow's "YCbCr"
# compute, and the fusion papers use); scikit-image's rgb2ycbcr is the studio-range variant
# (Y in 16..235), which would change the fused luminance's scale.
_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                          [-0.168736, -0.331264, 0.5],
                          [0.5, -0.418688, -0.081312]])
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
  """``[..., 3]`` RGB in 0..255 -> float YCbCr (BT.601 full range, chroma centred on 128)."""
  ycc = np.asarray(rgb, np.float64) @ _RGB_TO_YCBCR.T
  ycc[..., 1:] += 128.0
  return ycc


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
  """The inverse of `rgb_to_ycbcr` (float, not clipped)."""
  centred = np.asarray(ycc, np.float64).copy()
  centred[..., 1:] -= 128.0
  return centred @ _YCBCR_TO_RGB.T


def luminance(image: np.ndarray) -> np.ndarray:
  """Float ``[H, W]`` grey levels: a grey image as it is, an RGB image's Y (BT.601)."""
  image = np.asarray(image, np.float64)
  return image @ _RGB_TO_YCBCR[0] if image.ndim == 3 else image


def mean_fusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The pixel-wise mean."""
  return (a + b) / 2.0


def max_fusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The pixel-wise maximum."""
  return np.maximum(a, b)


def _choose_max_abs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per coefficient, the one of larger magnitude (``x`` on ties)."""
  return np.where(np.abs(x) >= np.abs(y), x, y)


def _reduce(image: np.ndarray) -> np.ndarray:
  """One pyramid step down: smooth with the 5-tap kernel, keep every second row and column."""
  smooth = ndimage.correlate1d(image, _BURT, axis=0, mode="reflect")
  smooth = ndimage.correlate1d(smooth, _BURT, axis=1, mode="reflect")
  return smooth[::2, ::2]


def _expand(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """One step up to ``shape``: zeros between samples, smoothed, scaled by 4 (Burt's EXPAND)."""
  up = np.zeros(shape, np.float64)
  up[::2, ::2] = image
  up = ndimage.correlate1d(up, 2.0 * _BURT, axis=0, mode="reflect")
  return ndimage.correlate1d(up, 2.0 * _BURT, axis=1, mode="reflect")


def laplacian_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
  """``levels`` band-pass images (finest first) and the low-pass top: ``levels + 1`` arrays.

  Exactly inverted by `collapse_pyramid` whatever the image size (each band is the difference to
  the expanded next level, so collapsing adds back what was taken).
  """
  bands, current = [], np.asarray(image, np.float64)
  for _ in range(levels):
    if min(current.shape) < 2:
      break
    down = _reduce(current)
    bands.append(current - _expand(down, current.shape))
    current = down
  return bands + [current]


def collapse_pyramid(pyramid: list[np.ndarray]) -> np.ndarray:
  """The image a `laplacian_pyramid` came from."""
  image = pyramid[-1]
  for band in reversed(pyramid[:-1]):
    image = band + _expand(image, band.shape)
  return image


def pyramid_fusion(a: np.ndarray, b: np.ndarray, levels: int = 4) -> np.ndarray:
  """Laplacian-pyramid fusion: max-abs band-pass coefficients, averaged low-pass top."""
  pa, pb = laplacian_pyramid(a, levels), laplacian_pyramid(b, levels)
  fused = [_choose_max_abs(x, y) for x, y in zip(pa[:-1], pb[:-1])]
  return collapse_pyramid(fused + [(pa[-1] + pb[-1]) / 2.0])


def wavelet_fusion(a: np.ndarray, b: np.ndarray, wavelet: str = "db2", levels: int = 3
                   ) -> np.ndarray:
  """Discrete-wavelet fusion (PyWavelets ``wavedec2``): max-abs details, averaged approximation.

  Args:
    wavelet: any PyWavelets discrete wavelet name.
    levels: decomposition levels (capped at PyWavelets' maximum for the image size).
  """
  levels = min(levels, pywt.dwtn_max_level(a.shape, wavelet))
  ca = pywt.wavedec2(a, wavelet, mode="symmetric", level=levels)
  cb = pywt.wavedec2(b, wavelet, mode="symmetric", level=levels)
  fused = [(ca[0] + cb[0]) / 2.0]
  for da, db in zip(ca[1:], cb[1:]):
    fused.append(tuple(_choose_max_abs(x, y) for x, y in zip(da, db)))
  out = pywt.waverec2(fused, wavelet, mode="symmetric")
  return out[:a.shape[0], :a.shape[1]]


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mean": mean_fusion,
    "max": max_fusion,
    "pyramid": pyramid_fusion,
    "wavelet": wavelet_fusion,
}


def fuse(a: np.ndarray, b: np.ndarray, method: str | Callable = "pyramid") -> np.ndarray:
  """Fuses two co-registered images; a colour one through its luminance.

  Args:
    a, b: ``[H, W]`` grey or ``[H, W, 3]`` RGB arrays, values 0..255 (uint8 as read, or float).
    method: a name of `METHODS`, or any ``f(a, b) -> fused`` on float ``[H, W]`` grey images
      (a learned model's, for instance).

  Returns:
    Float ``[H, W]`` in 0..255 when both are grey; float RGB ``[H, W, 3]`` when one or both are
    colour: the fused luminance with the colour source's chroma (of the more saturated source,
    pixel by pixel, when both are colour).

  Raises:
    ValueError: the images' sizes differ, or the method is unknown.
  """
  if isinstance(method, str):
    if method not in METHODS:
      raise ValueError(f"unknown fusion method {method!r}; one of {', '.join(METHODS)}")
    method = METHODS[method]
  a, b = np.asarray(a), np.asarray(b)
  if a.shape[:2] != b.shape[:2]:
    raise ValueError(f"the images' sizes differ: {a.shape[:2]} and {b.shape[:2]}")
  fused_y = np.clip(method(luminance(a), luminance(b)), 0.0, 255.0)
  colour = [rgb_to_ycbcr(x) for x in (a, b) if x.ndim == 3]
  if not colour:
    return fused_y
  chroma = colour[0][..., 1:]
  if len(colour) == 2:  # both colour: per pixel, the chroma farther from grey
    other = colour[1][..., 1:]
    far = np.abs(other - 128.0).sum(-1) > np.abs(chroma - 128.0).sum(-1)
    chroma = np.where(far[..., None], other, chroma)
  rgb = ycbcr_to_rgb(np.concatenate([fused_y[..., None], chroma], axis=-1))
  return np.clip(rgb, 0.0, 255.0)


def to_uint8(fused: np.ndarray) -> np.ndarray:
  """A fused image rounded to the uint8 that is written and scored."""
  return np.clip(np.round(fused), 0, 255).astype(np.uint8)
