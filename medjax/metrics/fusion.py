"""Image-fusion metrics as the field computes them: EN, SD, SF, MI, SCD, VIF, Qabf, SSIM.

Definitions follow the evaluation code most recent papers report with, CDDFuse's
``utils/Evaluator.py`` (Zhao et al., CVPR 2023), re-implemented here with numpy/scipy:

* all images are ``[H, W]`` grey levels 0..255 (a colour image's BT.601 luma, rounded: the
  reference reads every image, fused or source, with OpenCV as 8-bit grey);
* EN, SD, SF score the fused image alone; MI, VIF and SSIM are **sums** over the two sources
  (so a perfect copy of both would score twice the single-source value), SCD a sum of two
  correlations, Qabf one edge-weighted score over both.

Where the reference leans on a library default, the value it effectively ran with is kept and
named: MI in nats (scikit-learn's ``mutual_info_score``), and SSIM with ``data_range=2`` (what
scikit-image 0.19, the version CDDFuse pins, took for float images: its float range -1..1, i.e.
almost no stabilising constants), a 7x7 uniform window and the sample covariance.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medjax.data.fusion import luminance

METRICS = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")


def _grey_levels(image: np.ndarray) -> np.ndarray:
  """Integer grey levels 0..255 (rounded, clipped) as int64."""
  return np.clip(np.round(np.asarray(image, np.float64)), 0, 255).astype(np.int64)


def entropy(fused: np.ndarray) -> float:
  """EN: Shannon entropy (bits) of the 256-bin grey-level histogram of the rounded image."""
  p = np.bincount(_grey_levels(fused).ravel(), minlength=256) / fused.size
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def standard_deviation(fused: np.ndarray) -> float:
  """SD: the population standard deviation of the fused image's grey levels (contrast)."""
  return float(np.std(np.asarray(fused, np.float64)))


def spatial_frequency(fused: np.ndarray) -> float:
  """SF: ``sqrt(RF² + CF²)``, RF² and CF² the mean squared horizontal and vertical differences."""
  f = np.asarray(fused, np.float64)
  return float(np.sqrt(np.mean(np.diff(f, axis=1) ** 2) + np.mean(np.diff(f, axis=0) ** 2)))


def _mutual_information(x: np.ndarray, y: np.ndarray) -> float:
  """MI (nats) of two images' grey levels from their 256×256 joint histogram."""
  joint = np.bincount((_grey_levels(x) * 256 + _grey_levels(y)).ravel(),
                      minlength=256 * 256).reshape(256, 256) / x.size
  px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
  nz = joint > 0
  return float((joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum())


def mutual_information(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """MI: ``MI(F, A) + MI(F, B)`` in nats over grey levels."""
  return _mutual_information(fused, a) + _mutual_information(fused, b)


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
  x, y = x - x.mean(), y - y.mean()
  with np.errstate(divide="ignore", invalid="ignore"):  # a constant x or y: NaN, said below
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def scd(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """SCD (Aslantas & Bendes 2015): ``corr(F - B, A) + corr(F - A, B)``.

  The difference ``F - B`` is what the fused image took from ``A`` (and ``F - A`` from ``B``);
  an exact copy of a source (or a constant image) makes it undefined, NaN, as in the reference.
  """
  f, a, b = (np.asarray(x, np.float64) for x in (fused, a, b))
  return _correlation(f - b, a) + _correlation(f - a, b)


def _gaussian_window(n: int) -> np.ndarray:
  """The 1-D factor of VIF's ``n``×``n`` Gaussian window (σ = n/5, normalised)."""
  x = np.arange(n) - (n - 1) / 2.0
  w = np.exp(-x * x / (2.0 * (n / 5.0) ** 2))
  return w / w.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Separable filtering by ``outer(window, window)``, keeping the 'valid' part only."""
  out = ndimage.correlate1d(image, window, axis=0)
  out = ndimage.correlate1d(out, window, axis=1)
  r = len(window) // 2
  return out[r:out.shape[0] - r, r:out.shape[1] - r]


def _vif_single(ref: np.ndarray, dist: np.ndarray, noise_var: float = 2.0, eps: float = 1e-10
                ) -> float:
  """Pixel-domain VIF (Sheikh & Bovik 2006, MATLAB ``vifvec``'s pixel form) of ``dist`` to ``ref``.

  Four scales with Gaussian windows of 17, 9, 5 and 3 pixels; between scales both images are
  filtered and subsampled by 2. Undefined (NaN) counts as 1, as in the reference.
  """
  num = den = 0.0
  for scale in range(4):
    window = _gaussian_window(2 ** (4 - scale) + 1)
    if scale > 0:
      ref = _filter_valid(ref, window)[::2, ::2]
      dist = _filter_valid(dist, window)[::2, ::2]
    mu1, mu2 = _filter_valid(ref, window), _filter_valid(dist, window)
    s1 = np.maximum(_filter_valid(ref * ref, window) - mu1 * mu1, 0.0)
    s2 = np.maximum(_filter_valid(dist * dist, window) - mu2 * mu2, 0.0)
    s12 = _filter_valid(ref * dist, window) - mu1 * mu2
    g = s12 / (s1 + eps)
    sv = s2 - g * s12
    flat_ref, flat_dist = s1 < eps, s2 < eps
    g[flat_ref], sv[flat_ref], s1[flat_ref] = 0.0, s2[flat_ref], 0.0
    g[flat_dist], sv[flat_dist] = 0.0, 0.0
    negative = g < 0
    sv[negative], g[negative] = s2[negative], 0.0
    sv = np.maximum(sv, eps)
    num += np.log10(1.0 + g * g * s1 / (sv + noise_var)).sum()
    den += np.log10(1.0 + s1 / noise_var).sum()
  vif = num / den if den > 0 else np.nan
  return 1.0 if np.isnan(vif) else float(vif)


def vif(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """VIF: ``VIF(A → F) + VIF(B → F)``, each the information of the source kept in the fused."""
  f, a, b = (np.asarray(x, np.float64) for x in (fused, a, b))
  return _vif_single(a, f) + _vif_single(b, f)


# Sobel kernels, convolved (not correlated) with zero padding, as in the reference.
_SOBEL_Y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _edges(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sobel gradient magnitude and orientation ``atan(gy / gx)`` (π/2 where ``gx == 0``)."""
  gx = ndimage.convolve(image, _SOBEL_X, mode="constant")
  gy = ndimage.convolve(image, _SOBEL_Y, mode="constant")
  magnitude = np.sqrt(gx * gx + gy * gy)
  with np.errstate(divide="ignore", invalid="ignore"):
    angle = np.where(gx == 0, np.pi / 2, np.arctan(gy / np.where(gx == 0, 1.0, gx)))
  return magnitude, angle


def _edge_preservation(g_src, a_src, g_f, a_f) -> np.ndarray:
  """Per pixel, how well F keeps the source's edge strength and orientation (Xydeas & Petrović).

  Strength ratio ``min/max`` of the two magnitudes (the reference takes F's magnitude where the
  two are equal: 0, not 1, where both are flat); both passed through its sigmoids.
  """
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(g_src > g_f, g_f / g_src, np.where(g_src < g_f, g_src / g_f, g_f))
  orientation = 1.0 - np.abs(a_src - a_f) / (np.pi / 2)
  q_strength = 0.9994 / (1.0 + np.exp(-15.0 * (ratio - 0.5)))
  q_orientation = 0.9879 / (1.0 + np.exp(-22.0 * (orientation - 0.8)))
  return q_strength * q_orientation


def qabf(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """Qabf (Xydeas & Petrović 2000): the sources' edges kept in F, weighted by their strength."""
  f, a, b = (np.asarray(x, np.float64) for x in (fused, a, b))
  (ga, aa), (gb, ab), (gf, af) = _edges(a), _edges(b), _edges(f)
  kept = _edge_preservation(ga, aa, gf, af) * ga + _edge_preservation(gb, ab, gf, af) * gb
  return float(kept.sum() / (ga + gb).sum())


def _ssim_single(x: np.ndarray, y: np.ndarray, data_range: float, win: int = 7) -> float:
  """Mean SSIM over a ``win``×``win`` uniform window with the sample covariance (Wang et al.'s
  formula, scikit-image's defaults), the window's half-width cropped at the borders."""
  ux, uy = ndimage.uniform_filter(x, win), ndimage.uniform_filter(y, win)
  norm = win * win / (win * win - 1.0)
  vx = norm * (ndimage.uniform_filter(x * x, win) - ux * ux)
  vy = norm * (ndimage.uniform_filter(y * y, win) - uy * uy)
  vxy = norm * (ndimage.uniform_filter(x * y, win) - ux * uy)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  r = win // 2
  return float(s[r:-r, r:-r].mean())


def ssim(fused: np.ndarray, a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
  """SSIM: ``SSIM(F, A) + SSIM(F, B)``; ``data_range=2`` is the reference's effective value (see
  the module docstring), 255 the textbook one for 8-bit images."""
  f, a, b = (np.asarray(x, np.float64) for x in (fused, a, b))
  return _ssim_single(f, a, data_range) + _ssim_single(f, b, data_range)


def fusion_metrics(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """All of `METRICS` for one fused image and its two sources (grey ``[H, W]``, 0..255)."""
  f, a, b = (np.asarray(x, np.float64) for x in (fused, a, b))
  if not f.shape == a.shape == b.shape or f.ndim != 2:
    raise ValueError(f"fusion metrics need three grey [H, W] images of one size, got "
                     f"{f.shape}, {a.shape}, {b.shape}")
  return {"EN": entropy(f), "SD": standard_deviation(f), "SF": spatial_frequency(f),
          "MI": mutual_information(f, a, b), "SCD": scd(f, a, b), "VIF": vif(f, a, b),
          "Qabf": qabf(f, a, b), "SSIM": ssim(f, a, b)}


def mean_metrics(sources: np.ndarray, fused: np.ndarray) -> dict[str, float]:
  """The mean of each of `METRICS` over a set of images (a validation split, say).

  Args:
    sources: ``[N, H, W, 2]`` grey levels 0..255 of the two sources (A, B as channels).
    fused: ``[N, H, W]`` or ``[N, H, W, 1]`` grey levels 0..255; rounded here, as a written image
      would be.
  """
  fused = np.asarray(fused, np.float64)
  fused = np.clip(np.round(fused[..., 0] if fused.ndim == 4 else fused), 0, 255)
  scores = [fusion_metrics(f, s[..., 0], s[..., 1]) for f, s in zip(fused, sources)]
  return {k: float(np.mean([s[k] for s in scores])) for k in METRICS}


def grey(image: np.ndarray) -> np.ndarray:
  """The grey levels the reference scores: a grey image rounded, an RGB image's BT.601 luma
  rounded (OpenCV's 8-bit ``COLOR_BGR2GRAY``), as float ``[H, W]``."""
  return np.clip(np.round(luminance(image)), 0, 255)


def score(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """`fusion_metrics` of images as written and read (uint8 grey or RGB), through `grey`."""
  return fusion_metrics(grey(fused), grey(a), grey(b))
