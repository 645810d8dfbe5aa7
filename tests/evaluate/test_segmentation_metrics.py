"""Segmentation metrics: hand-checked values, a brute-force surface reference and MONAI parity."""

import itertools

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medjax.evaluate import segmentation as seg


def _box(shape, *ranges):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(a, b) for a, b in ranges)] = True
  return mask


def _blob(shape, seed, threshold=0.6):
  noise = np.random.default_rng(seed).normal(size=shape)
  smooth = ndimage.gaussian_filter(noise, 2.0)
  return smooth > threshold * smooth.std()


def _brute_surface(mask):
  """Voxels with a face neighbour outside the mask or outside the image."""
  padded = np.pad(mask, 1)
  surface = np.zeros_like(mask)
  for axis, shift in itertools.product(range(mask.ndim), (-1, 1)):
    surface |= mask & ~np.roll(padded, shift, axis)[tuple(slice(1, -1) for _ in mask.shape)]
  return surface


def _brute_distances(pred, ref, spacing):
  p = np.argwhere(_brute_surface(pred)) * spacing
  r = np.argwhere(_brute_surface(ref)) * spacing
  d = cdist(p, r)
  return d.min(1), d.min(0)


def test_dice_iou_hand_built():
  pred, ref = np.zeros(10, bool), np.zeros(10, bool)
  pred[1:5] = True  # 4 voxels
  ref[2:8] = True  # 6 voxels, 3 shared
  assert seg.dice(pred, ref) == pytest.approx(2 * 3 / 10)
  assert seg.iou(pred, ref) == pytest.approx(3 / 7)
  assert seg.dice(ref, ref) == 1.0 and seg.iou(ref, ref) == 1.0
  assert seg.dice(pred, ~pred) == 0.0


@pytest.mark.parametrize("spacing", [(0.7, 1.3, 2.0), (2.5, 0.5, 1.0)])
def test_parallel_planes_distance_is_exact_in_mm(spacing):
  shape = (12, 9, 7)
  ref, pred = _box(shape, (2, 3), (0, 9), (0, 7)), _box(shape, (7, 8), (0, 9), (0, 7))
  expected = 5 * spacing[0]
  d_pred, d_ref = seg.surface_distances(pred, ref, spacing)
  np.testing.assert_allclose(d_pred, expected)
  np.testing.assert_allclose(d_ref, expected)
  assert seg.hd95(pred, ref, spacing) == pytest.approx(expected)
  assert seg.mean_surface_distance(pred, ref, spacing) == pytest.approx(expected)


def test_parallel_lines_2d():
  ref, pred = _box((6, 10), (0, 6), (1, 2)), _box((6, 10), (0, 6), (4, 5))
  assert seg.hd95(pred, ref, (0.9, 0.6)) == pytest.approx(3 * 0.6)
  assert seg.mean_surface_distance(pred, ref, (0.9, 0.6)) == pytest.approx(3 * 0.6)


def test_cube_shifted_two_voxels():
  shape, spacing = (16, 14, 14), np.array([1.5, 1.0, 1.0])
  ref = _box(shape, (4, 10), (4, 10), (4, 10))
  pred = _box(shape, (6, 12), (4, 10), (4, 10))
  d_pred, d_ref = seg.surface_distances(pred, ref, spacing)
  assert max(d_pred.max(), d_ref.max()) == pytest.approx(3.0)  # Hausdorff = 2 voxels × 1.5 mm
  b_pred, b_ref = _brute_distances(pred, ref, spacing)
  np.testing.assert_allclose(np.sort(d_pred), np.sort(b_pred))
  np.testing.assert_allclose(np.sort(d_ref), np.sort(b_ref))
  expected = max(np.percentile(b_pred, 95), np.percentile(b_ref, 95))
  assert seg.hd95(pred, ref, spacing) == pytest.approx(expected)
  assert seg.mean_surface_distance(pred, ref, spacing) == pytest.approx(
      np.concatenate([b_pred, b_ref]).mean())
  assert seg.dice(pred, ref) == pytest.approx(2 * 4 / 12)


def test_surface_matches_brute_force_on_blobs_touching_the_border():
  pred, ref = _blob((20, 17, 11), 0), _blob((20, 17, 11), 1)
  spacing = np.array([0.8, 1.1, 2.3])
  for got, want in zip(seg.surface_distances(pred, ref, spacing),
                       _brute_distances(pred, ref, spacing)):
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notices
def test_matches_monai_on_random_blobs():
  torch = pytest.importorskip("torch")
  monai_metrics = pytest.importorskip("monai.metrics")
  spacing = (0.8, 1.2, 2.5)
  for seed in range(3):
    pred, ref = _blob((24, 20, 16), 2 * seed), _blob((24, 20, 16), 2 * seed + 1)
    y_pred = torch.from_numpy(np.stack([~pred, pred])[None].astype(np.float32))
    y = torch.from_numpy(np.stack([~ref, ref])[None].astype(np.float32))
    want_dice = float(monai_metrics.compute_dice(y_pred, y, include_background=False))
    want_hd95 = float(monai_metrics.compute_hausdorff_distance(
        y_pred, y, include_background=False, percentile=95, spacing=spacing))
    want_msd = float(monai_metrics.compute_average_surface_distance(
        y_pred, y, include_background=False, symmetric=True, spacing=spacing))
    assert seg.dice(pred, ref) == pytest.approx(want_dice, abs=1e-6)
    # Same definition as MONAI, so far tighter than the voxel diagonal (float32 in torch).
    assert seg.hd95(pred, ref, spacing) == pytest.approx(want_hd95, rel=1e-5)
    assert seg.mean_surface_distance(pred, ref, spacing) == pytest.approx(want_msd, rel=1e-5)


def test_empty_conventions():
  shape, spacing = (10, 8, 6), (1.0, 2.0, 0.5)
  empty, full = np.zeros(shape, bool), _box(shape, (2, 5), (2, 5), (1, 3))
  for f in (seg.dice, seg.iou):
    assert np.isnan(f(empty, empty))
    assert f(empty, full) == 0.0 and f(full, empty) == 0.0
  assert np.isnan(seg.hd95(empty, empty, spacing))
  assert np.isnan(seg.mean_surface_distance(empty, empty, spacing))
  diagonal = np.sqrt(10.0 ** 2 + 16.0 ** 2 + 3.0 ** 2)
  assert seg.image_diagonal(shape, spacing) == pytest.approx(diagonal)
  for a, b in ((empty, full), (full, empty)):
    assert seg.hd95(a, b, spacing) == pytest.approx(diagonal)
    assert seg.mean_surface_distance(a, b, spacing) == pytest.approx(diagonal)
  d_pred, d_ref = seg.surface_distances(full, empty, spacing)
  assert np.all(np.isinf(d_pred)) and d_ref.size == 0


def test_segmentation_metrics_per_class_and_region():
  ref = np.zeros((12, 10, 8), np.uint8)
  ref[2:6, 2:6, 2:6] = 1
  ref[7:10, 2:6, 2:6] = 2
  pred = ref.copy()
  pred[7:10] = 0  # class 2 missed entirely
  out = seg.segmentation_metrics(pred[..., None], ref[..., None], (1.0, 1.0, 1.0),
                                 [1, 2, 3, (1, 2)])
  assert set(out) == {1, 2, 3, (1, 2)}
  assert out[1]["dice"] == 1.0 and out[1]["hd95"] == 0.0 and out[1]["msd"] == 0.0
  assert out[2]["dice"] == 0.0 and out[2]["hd95"] == pytest.approx(np.sqrt(12**2 + 10**2 + 8**2))
  assert out[2]["ref_voxels"] == 48 and out[2]["pred_voxels"] == 0
  assert np.isnan(out[3]["dice"]) and np.isnan(out[3]["hd95"])
  assert out[(1, 2)]["dice"] == pytest.approx(2 * 64 / (64 + 112))
  with pytest.raises(ValueError, match="spacing"):
    seg.segmentation_metrics(pred, ref, (1.0, 1.0), [1])


def test_summarize_nanmean_and_foreground():
  nan = float("nan")
  case = lambda d1, d2, h1: {1: {"dice": d1, "iou": d1, "hd95": h1, "msd": h1},
                             2: {"dice": d2, "iou": d2, "hd95": 1.0, "msd": 1.0}}
  cases = [case(0.8, 0.5, 2.0), case(0.6, nan, 4.0), case(nan, 0.7, nan)]
  s = seg.summarize(cases)
  assert s.num_cases == 3 and s.classes == (1, 2)
  assert s.mean[1]["dice"] == pytest.approx(0.7) and s.std[1]["dice"] == pytest.approx(0.1)
  assert s.count[1]["dice"] == 2 and s.count[2]["dice"] == 2
  assert s.mean[1]["hd95"] == pytest.approx(3.0)
  assert s.foreground_dice == pytest.approx((0.7 + 0.6) / 2)
  with_background = [{0: {m: 0.0 for m in seg.METRICS}, **c} for c in cases]
  assert seg.summarize(with_background).foreground_dice == pytest.approx(s.foreground_dice)
  all_nan = seg.summarize([{1: {m: nan for m in seg.METRICS}}])
  assert np.isnan(all_nan.mean[1]["dice"]) and all_nan.count[1]["dice"] == 0


def test_format_table_has_names_and_values():
  ref = np.zeros((8, 8, 8), np.uint8)
  ref[1:4, 1:4, 1:4], ref[5:7, 5:7, 5:7] = 1, 2
  cases = [seg.segmentation_metrics(ref, ref, (1, 1, 1), [1, 2, (1, 2)]) for _ in range(2)]
  summary = seg.summarize(cases)
  table = seg.format_table(summary, {1: "liver", 2: "tumour|core"})
  assert "liver" in table and "tumour\\|core" in table and "| 1+2 |" in table
  assert "1.000 ± 0.000" in table and "Foreground mean" in table
  assert all(line.startswith("|") for line in table.strip().splitlines())
  assert "kidney" in seg.format_table(summary, ["kidney", "cyst", "both"])
  with pytest.raises(ValueError):
    seg.format_table(summary, ["too", "few"])
