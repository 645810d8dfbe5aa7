import grain
import numpy as np
import pytest

from medjax.data import transforms


def _record(shape=(8, 8, 1)):
  return {"image": np.arange(np.prod(shape), dtype=np.float32).reshape(shape), "label": 1}


def test_parse_builds_registered_ops_in_order():
  ops = transforms.parse("to_float|flip(axes=(0, 1), p=1.0)|normalize(0.5, 0.25)")
  assert [type(o).__name__ for o in ops] == ["ToFloat", "RandomFlip", "Normalize"]
  assert transforms.parse("") == []
  with pytest.raises(KeyError, match="unknown transforms 'nope'"):
    transforms.parse("to_float|nope")


def test_to_float_and_normalize():
  rec = {"image": np.full((2, 2, 1), 255, np.uint8)}
  out = transforms.Normalize(0.5, 0.5).map(transforms.ToFloat().map(rec))
  assert out["image"].dtype == np.float32
  np.testing.assert_allclose(out["image"], 1.0)


@pytest.mark.parametrize("shape,axis", [((6, 5, 1), 0), ((6, 5, 1), 1), ((4, 6, 5, 2), 2)])
def test_flip_always_flips_the_requested_axis(shape, axis):
  rec = _record(shape)
  out = transforms.RandomFlip(axes=(axis,), p=1.0).random_map(rec, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], np.flip(rec["image"], axis))
  assert out["label"] == 1


def test_affine_identity_when_ranges_are_zero_2d_and_3d():
  for shape in [(9, 7, 1), (5, 9, 7, 1)]:
    rec = _record(shape)
    op = transforms.RandomAffine(rotate=0, scale=0, translate=0)
    out = op.random_map(rec, np.random.default_rng(0))
    np.testing.assert_allclose(out["image"], rec["image"], atol=1e-4)


def test_affine_changes_image_and_keeps_shape():
  rec = _record((4, 12, 12, 1))
  out = transforms.RandomAffine(rotate=20).random_map(rec, np.random.default_rng(1))
  assert out["image"].shape == rec["image"].shape
  assert not np.allclose(out["image"], rec["image"])


def test_random_ops_are_deterministic_under_a_grain_seed():
  images = np.random.default_rng(0).integers(0, 255, (16, 10, 10, 1)).astype(np.uint8)
  ops = transforms.parse("to_float|flip(axes=(0, 1))|affine|intensity(p=1.0)")

  def run(seed):
    ds = grain.MapDataset.source([{"image": im} for im in images])
    for k, op in enumerate(ops):
      ds = ds.random_map(op, seed=seed + k) if isinstance(
          op, grain.transforms.RandomMap) else ds.map(op)
    return np.stack([r["image"] for r in ds])

  np.testing.assert_array_equal(run(3), run(3))
  assert not np.allclose(run(3), run(4))


# --- Preprocessing chain -----------------------------------------------------------------------


def _blob(shape, radius, dtype=np.float32):
  """A centred ball of ones (a disk in 2-D) as a channels-last image."""
  grid = np.indices(shape) - (np.array(shape)[:, None] - 1).reshape(-1, *[1] * len(shape)) / 2
  return (np.sqrt((grid ** 2).sum(0)) <= radius).astype(dtype)[..., None]


def _seg_record(shape=(24, 24)):
  """A binary ball plus an off-centre bar, with the label exactly its foreground.

  The bar makes flips and rotations visible; the label lets alignment be checked after a warp.
  """
  n = shape[0]
  image = _blob(shape, n // 5)
  bar = (slice(n // 8, n // 3), slice(n // 4, 3 * n // 4)) + (slice(n // 3, 2 * n // 3),) * (
      len(shape) - 2)
  image[bar] = 1.0
  return {"image": image, "label": image.astype(np.uint8), "spacing": np.ones(len(shape))}


def _dice(image, label):
  """Overlap of the thresholded image with the label: 1 when they mark the same voxels."""
  a, b = image[..., 0] > 0.5, label[..., 0] > 0
  return 2 * np.sum(a & b) / (a.sum() + b.sum())


def test_parse_builds_a_long_chain_and_runs_it_on_a_3d_record():
  spec = ("clip(-1000, 1000)|window(preset='lung')|resample(spacing=(2., 2., 2.))"
          "|crop_foreground(margin=1)|crop_or_pad(shape=(8, 8, 8))|zscore(nonzero=True)"
          "|percentile_clip(1, 99)|greyscale|flip(axes=(0, 1, 2))|rot90(axes=(1, 2), p=1.)"
          "|rotate(degrees=10)|affine|elastic(alpha=(0., 50.), p=1.)|gamma(p=1.)|noise(p=1.)"
          "|blur(p=1.)|contrast(p=1.)|intensity(p=1.)")
  ops = transforms.parse(spec)
  assert len(ops) == 18
  image = np.where(_blob((16, 16, 12), 5) > 0, 40.0, -900.0).astype(np.float32)
  rec = {"image": image, "label": (image > 0).astype(np.uint8),
         "spacing": np.array([1.0, 1.0, 1.5])}
  rng = np.random.default_rng(0)
  for op in ops:
    rec = op.random_map(rec, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(rec)
  assert rec["image"].shape == rec["label"].shape == (8, 8, 8, 1)
  assert rec["image"].dtype == np.float32 and rec["label"].dtype == np.uint8
  assert rec["image"].flags.c_contiguous and rec["label"].flags.c_contiguous
  assert np.isfinite(rec["image"]).all()
  assert set(np.unique(rec["label"])) <= {0, 1}


@pytest.mark.parametrize("preset", list(transforms.WINDOW_PRESETS))
def test_window_preset_maps_its_ends_to_zero_and_one(preset):
  level, width = transforms.WINDOW_PRESETS[preset]
  hu = np.array([level - width, level - width / 2, level, level + width / 2, level + width])
  out = transforms.Window(preset=preset).map({"image": hu.reshape(5, 1, 1)})["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out.ravel(), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_window_level_width_and_out_range():
  hu = np.array([-100.0, 0.0, 100.0], np.float32).reshape(3, 1, 1)
  out = transforms.Window(level=0, width=200, out_range=(-1.0, 1.0)).map({"image": hu})["image"]
  np.testing.assert_allclose(out.ravel(), [-1, 0, 1], atol=1e-6)
  # Bone and lung are standard windows with well-known HU bounds.
  assert transforms.Window(preset="lung").bounds == (-1350.0, 150.0)
  assert transforms.Window(preset="bone").bounds == (-500.0, 1300.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="kidney"), "unknown preset"),
    (dict(level=40, width=-80), "width"),
    (dict(level=40), "both level and width"),
    (dict(preset="lung", level=0, width=10), "not both"),
])
def test_window_bad_arguments_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=f"window: .*{match}"):
    transforms.Window(**kwargs)


def test_clip_keeps_integer_dtype_and_bounds():
  image = np.array([-3000, -1000, 0, 500, 4000], np.int16).reshape(5, 1, 1)
  out = transforms.Clip(-1000, 1000).map({"image": image})["image"]
  assert out.dtype == np.int16
  np.testing.assert_array_equal(out.ravel(), [-1000, -1000, 0, 500, 1000])
  out = transforms.Clip(-0.5, 0.5).map({"image": image.astype(np.float32)})["image"]
  np.testing.assert_array_equal(out.ravel(), [-0.5, -0.5, 0, 0.5, 0.5])
  with pytest.raises(ValueError, match="clip: "):
    transforms.Clip(1, 0)


def test_zscore_nonzero_normalises_foreground_and_zeroes_background():
  rng = np.random.default_rng(0)
  image = np.zeros((12, 12, 2), np.float32)
  image[2:9, 3:10] = rng.normal([5.0, -20.0], [2.0, 7.0], (7, 7, 2))
  out = transforms.ZScore(nonzero=True).map({"image": image})["image"]
  inside = image[..., 0] != 0
  for c in range(2):
    np.testing.assert_allclose(out[..., c][inside].mean(), 0, atol=1e-5)
    np.testing.assert_allclose(out[..., c][inside].std(), 1, atol=1e-5)
  assert np.all(out[~inside] == 0)


def test_zscore_with_mask_key_and_plain():
  rng = np.random.default_rng(1)
  image = rng.normal(3.0, 2.0, (10, 10, 1)).astype(np.float32)
  mask = np.zeros((10, 10), bool)
  mask[:5] = True
  out = transforms.ZScore(mask_key="body").map({"image": image, "body": mask})["image"]
  np.testing.assert_allclose(out[mask].mean(), 0, atol=1e-5)
  np.testing.assert_allclose(out[mask].std(), 1, atol=1e-5)
  assert np.all(out[~mask] == 0)
  out = transforms.ZScore().map({"image": image})["image"]
  np.testing.assert_allclose([out.mean(), out.std()], [0, 1], atol=1e-5)
  # per_channel=False: one mean/std over both channels, so the channels keep their offset.
  two = np.concatenate([image, image + 10], axis=-1)
  out = transforms.ZScore(per_channel=False).map({"image": two})["image"]
  np.testing.assert_allclose([out.mean(), out.std()], [0, 1], atol=1e-5)
  assert out[..., 1].mean() > out[..., 0].mean() + 1


def test_zscore_constant_image_and_empty_mask_give_zeros_not_nan():
  for rec, op in [({"image": np.full((4, 4, 1), 7.0)}, transforms.ZScore()),
                  ({"image": np.zeros((4, 4, 1))}, transforms.ZScore(nonzero=True))]:
    out = op.map(rec)["image"]
    assert out.dtype == np.float32 and np.all(out == 0)


def test_zscore_bad_arguments():
  with pytest.raises(ValueError, match="zscore: .*alternatives"):
    transforms.ZScore(nonzero=True, mask_key="m")
  with pytest.raises(ValueError, match="zscore: record has no mask 'm'"):
    transforms.ZScore(mask_key="m").map({"image": np.ones((3, 3, 1))})
  with pytest.raises(ValueError, match="zscore: mask shape"):
    transforms.ZScore(mask_key="m").map({"image": np.ones((3, 3, 1)), "m": np.ones((2, 3))})


def test_percentile_clip_matches_numpy_percentiles_per_channel():
  image = np.random.default_rng(0).normal(0, [1.0, 50.0], (30, 30, 2)).astype(np.float32)
  out = transforms.PercentileClip(0.5, 99.5).map({"image": image})["image"]
  for c in range(2):
    lo, hi = np.percentile(image[..., c], [0.5, 99.5])
    np.testing.assert_allclose([out[..., c].min(), out[..., c].max()], [lo, hi], rtol=1e-5)
    np.testing.assert_allclose(out[..., c], np.clip(image[..., c], lo, hi), rtol=1e-6)
  out = transforms.PercentileClip(5, 95, rescale=True).map({"image": image})["image"]
  np.testing.assert_allclose([out.min(), out.max()], [0, 1], atol=1e-6)
  assert np.all(transforms.PercentileClip(rescale=True).map(
      {"image": np.ones((3, 3, 1))})["image"] == 0)
  with pytest.raises(ValueError, match="percentile_clip: "):
    transforms.PercentileClip(60, 40)


def test_greyscale_uses_bt601_weights():
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[0, 0] = (255, 0, 0)
  rgb[0, 1] = (0, 255, 0)
  rgb[1, 0] = (0, 0, 255)
  rgb[1, 1] = (10, 20, 30)
  out = transforms.Greyscale().map({"image": rgb})["image"]
  assert out.shape == (2, 2, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], [[0.299 * 255, 0.587 * 255],
                                           [0.114 * 255, 0.299 * 10 + 0.587 * 20 + 0.114 * 30]],
                             rtol=1e-6)
  grey = np.arange(4.0).reshape(2, 2, 1)
  np.testing.assert_array_equal(transforms.Greyscale().map({"image": grey})["image"], grey)
  with pytest.raises(ValueError, match="greyscale: expects 1 or 3 channels, got 2"):
    transforms.Greyscale().map({"image": np.ones((2, 2, 2))})


# --- Resampling and cropping -------------------------------------------------------------------


def test_resample_halves_shape_when_spacing_doubles_and_keeps_label_values():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(8, 12, 6, 2)).astype(np.float32)
  label = rng.choice(np.array([0, 3, 7], np.int16), size=(8, 12, 6, 1))
  rec = {"image": image, "label": label, "spacing": np.array([1.0, 0.5, 2.0])}
  out = transforms.Resample(spacing=(2.0, 1.0, 4.0)).map(rec)
  assert out["image"].shape == (4, 6, 3, 2) and out["image"].dtype == np.float32
  assert out["label"].shape == (4, 6, 3, 1) and out["label"].dtype == np.int16
  assert set(np.unique(out["label"])) <= {0, 3, 7}
  np.testing.assert_allclose(out["spacing"], [2.0, 1.0, 4.0])
  # First voxel centres stay aligned: an exact halving picks every other input voxel.
  np.testing.assert_array_equal(out["label"], label[::2, ::2, ::2])
  np.testing.assert_allclose(out["image"], image[::2, ::2, ::2], atol=1e-6)


def test_resample_reports_the_effective_spacing_after_rounding():
  rec = {"image": np.zeros((5, 7, 1), np.float32), "spacing": np.array([1.0, 1.0])}
  out = transforms.Resample(spacing=(2.0, 0.6)).map(rec)
  assert out["image"].shape == (2, 12, 1)  # round(2.5) = 2, round(11.67) = 12
  np.testing.assert_allclose(out["spacing"], [2.5, 7 / 12])
  out = transforms.Resample(spacing=(100.0, 1.0)).map(rec)
  assert out["image"].shape == (1, 7, 1)


def test_resample_keeps_a_linear_ramp_linear():
  ramp = (3.0 * np.arange(10)[:, None] + 0.5 * np.arange(9)[None, :])[..., None]
  rec = {"image": ramp.astype(np.float32), "spacing": np.array([1.0, 1.0])}
  out = transforms.Resample(spacing=(0.4, 0.75)).map(rec)
  assert out["image"].shape == (25, 12, 1)
  step = out["spacing"]  # input voxels per output voxel, as the input spacing is 1
  expect = 3.0 * step[0] * np.arange(25)[:, None] + 0.5 * step[1] * np.arange(12)[None, :]
  # Interior = samples inside the input's last voxel centre (past it the edge value is held).
  inside = (np.arange(25)[:, None] * step[0] <= 9) & (np.arange(12)[None, :] * step[1] <= 8)
  np.testing.assert_allclose(out["image"][..., 0][inside], expect[inside], atol=1e-4)


def test_resample_label_order_one_keeps_classes():
  label = np.zeros((12, 12, 1), np.uint8)
  label[3:9, 3:9] = 2
  label[5:7, 5:7] = 5
  rec = {"image": label.astype(np.float32), "label": label, "spacing": np.ones(2)}
  out = transforms.Resample(spacing=(0.5, 0.5), label_order=1).map(rec)
  assert out["label"].shape == (24, 24, 1) and out["label"].dtype == np.uint8
  assert set(np.unique(out["label"])) == {0, 2, 5}


@pytest.mark.parametrize("op,rec,match", [
    (transforms.Resample(spacing=(1.0, 1.0)), {"image": np.ones((3, 3, 1))}, "no 'spacing'"),
    (transforms.Resample(spacing=(1.0, 1.0, 1.0)),
     {"image": np.ones((3, 3, 1)), "spacing": np.ones(2)}, "target spacing"),
    (transforms.Resample(spacing=(1.0, 1.0)),
     {"image": np.ones((3, 3, 1)), "spacing": np.ones(3)}, "record spacing"),
])
def test_resample_bad_records(op, rec, match):
  with pytest.raises(ValueError, match=f"resample: .*{match}"):
    op.map(rec)


def test_resample_bad_arguments():
  with pytest.raises(ValueError, match="resample: spacing"):
    transforms.Resample(spacing=(1.0, 0.0))
  with pytest.raises(ValueError, match="resample: order"):
    transforms.Resample(order=7)


def test_crop_foreground_returns_the_box_plus_margin():
  image = np.zeros((10, 12, 2), np.float32)
  image[3:6, 4:9, 1] = 5.0
  label = (image[..., 1:] > 0).astype(np.uint8)
  rec = {"image": image, "label": label, "spacing": np.array([0.7, 0.8])}
  out = transforms.CropForeground().map(rec)
  np.testing.assert_array_equal(out["image"], image[3:6, 4:9])
  np.testing.assert_array_equal(out["label"], label[3:6, 4:9])
  np.testing.assert_array_equal(out["spacing"], rec["spacing"])
  out = transforms.CropForeground(margin=2).map(rec)
  np.testing.assert_array_equal(out["image"], image[1:8, 2:11])
  out = transforms.CropForeground(margin=(5, 1)).map(rec)  # clamped at the top edge
  np.testing.assert_array_equal(out["image"], image[0:10, 3:10])
  # Threshold: the 5.0 box is background when the threshold is above it.
  assert transforms.CropForeground(threshold=5.0).map(rec) is rec


def test_crop_foreground_leaves_empty_images_and_class_labels_alone():
  rec = {"image": np.zeros((4, 5, 1)), "label": 3}
  assert transforms.CropForeground().map(rec) is rec
  image = np.zeros((6, 6, 1))
  image[2, 3] = 1
  out = transforms.CropForeground().map({"image": image, "label": np.array([0, 1, 1])})
  assert out["image"].shape == (1, 1, 1)
  np.testing.assert_array_equal(out["label"], [0, 1, 1])
  with pytest.raises(ValueError, match="crop_foreground: margin"):
    transforms.CropForeground(margin=-1)


def test_crop_or_pad_round_trips_a_centred_object():
  image = _blob((9, 10), 3)
  rec = {"image": image, "label": image.astype(np.uint8)}
  big = transforms.CropOrPad(shape=(16, 13), value=-1.0).map(rec)
  assert big["image"].shape == (16, 13, 1) and big["label"].shape == (16, 13, 1)
  assert big["image"].min() == -1.0 and big["label"].min() == 0  # label padded with 0
  back = transforms.CropOrPad(shape=(9, 10)).map(big)
  np.testing.assert_array_equal(back["image"], rec["image"])
  np.testing.assert_array_equal(back["label"], rec["label"])
  # Mixed: crop one axis, pad the other; the object stays centred.
  mixed = transforms.CropOrPad(shape=(7, 14), mode="edge").map(rec)
  assert mixed["image"].shape == (7, 14, 1)
  np.testing.assert_array_equal(mixed["image"][:, 2:12], rec["image"][1:8])
  np.testing.assert_array_equal(mixed["label"][:, 2:12], rec["label"][1:8])


def test_crop_or_pad_bad_arguments():
  with pytest.raises(ValueError, match="crop_or_pad: shape"):
    transforms.CropOrPad(shape=(4, 0))
  with pytest.raises(ValueError, match="crop_or_pad: unknown mode"):
    transforms.CropOrPad(shape=(4, 4), mode="nope")
  with pytest.raises(ValueError, match="crop_or_pad: target shape"):
    transforms.CropOrPad(shape=(4, 4, 4)).map({"image": np.ones((3, 3, 1))})


# --- Spatial augmentation ----------------------------------------------------------------------


def test_rot90_four_times_is_identity_and_label_turns_with_the_image():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(5, 7, 4, 2)).astype(np.float32)
  label = rng.integers(0, 3, (5, 7, 4, 1)).astype(np.uint8)
  rec = {"image": image, "label": label, "spacing": np.array([1.0, 2.0, 3.0])}
  op = transforms.RandomRot90(axes=(0, 1), p=1.0)
  out = op.random_map(rec, np.random.default_rng(3))
  k = next(k for k in (1, 2, 3) if np.array_equal(out["image"], np.rot90(image, k, (0, 1))))
  np.testing.assert_array_equal(out["label"], np.rot90(label, k, (0, 1)))
  np.testing.assert_array_equal(out["spacing"], [2.0, 1.0, 3.0] if k % 2 else [1.0, 2.0, 3.0])
  turned = rec
  for _ in range(4):
    turned = {**turned, **_rot_quarter(turned)}
  np.testing.assert_array_equal(turned["image"], image)
  np.testing.assert_array_equal(turned["label"], label)
  np.testing.assert_array_equal(turned["spacing"], rec["spacing"])


def _rot_quarter(rec):
  """rot90 by exactly one quarter turn: finds a seed whose draw is k = 1."""
  op = transforms.RandomRot90(axes=(1, 2), p=1.0)
  for seed in range(100):
    out = op.random_map(rec, np.random.default_rng(seed))
    if np.array_equal(out["image"], np.rot90(rec["image"], 1, (1, 2))):
      return out
  raise AssertionError("no seed gave a quarter turn")


def test_rot90_bad_axes():
  with pytest.raises(ValueError, match="rot90: axes"):
    transforms.RandomRot90(axes=(1, 1))
  with pytest.raises(ValueError, match="rot90: axes"):
    transforms.RandomRot90(axes=(0, 2)).random_map({"image": np.ones((3, 3, 1))},
                                                   np.random.default_rng(0))


def test_flip_moves_a_spatial_label_and_passes_class_labels():
  rec = _seg_record()
  out = transforms.RandomFlip(axes=(0,), p=1.0).random_map(rec, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], np.flip(rec["image"], 0))
  np.testing.assert_array_equal(out["label"], np.flip(rec["label"], 0))
  rec = {**rec, "label": 4}
  assert transforms.RandomFlip(p=1.0).random_map(rec, np.random.default_rng(0))["label"] == 4


def test_elastic_with_zero_alpha_is_identity():
  rec = _seg_record((10, 9, 8))
  rec["image"] = rec["image"] * np.random.default_rng(0).normal(size=rec["image"].shape)
  out = transforms.RandomElastic(alpha=0.0, p=1.0).random_map(rec, np.random.default_rng(0))
  np.testing.assert_allclose(out["image"], rec["image"], atol=1e-6)
  np.testing.assert_array_equal(out["label"], rec["label"])


GEOMETRIC = {
    "flip": lambda: transforms.RandomFlip(axes=(0, 1), p=0.5),
    "rot90": lambda: transforms.RandomRot90(p=1.0),
    "affine": lambda: transforms.RandomAffine(rotate=30, scale=0.2, translate=0.1),
    "rotate": lambda: transforms.RandomRotate(degrees=40),
    "elastic": lambda: transforms.RandomElastic(alpha=(100.0, 300.0), sigma=(3.0, 4.0), p=1.0),
}
INTENSITY = {
    "gamma": lambda: transforms.RandomGamma(p=1.0),
    "gamma_invert": lambda: transforms.RandomGamma(p=1.0, invert=True),
    "noise": lambda: transforms.RandomNoise(std=(0.05, 0.2), p=1.0),
    "blur": lambda: transforms.RandomBlur(p=1.0),
    "contrast": lambda: transforms.RandomContrast(p=1.0),
    "intensity": lambda: transforms.RandomIntensity(p=1.0),
}


@pytest.mark.parametrize("name", list(GEOMETRIC) + list(INTENSITY))
@pytest.mark.parametrize("shape", [(24, 24), (16, 16, 16)])
def test_random_ops_are_seeded_by_the_rng_only(name, shape):
  op = {**GEOMETRIC, **INTENSITY}[name]()
  rec = _seg_record(shape)
  rec["image"] = rec["image"] + np.linspace(0, 0.3, rec["image"].size, dtype=np.float32).reshape(
      rec["image"].shape)  # a ramp so gamma/contrast have something to bend
  run = lambda seed: op.random_map(rec, np.random.default_rng(seed))["image"]
  np.testing.assert_array_equal(run(5), run(5))
  outs = [run(s) for s in range(6)]
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])
  assert all(o.dtype == np.float32 and o.flags.c_contiguous for o in outs)


@pytest.mark.parametrize("name", list(GEOMETRIC))
@pytest.mark.parametrize("shape", [(24, 24), (16, 16, 16)])
def test_geometric_ops_keep_label_aligned_with_image(name, shape):
  op = GEOMETRIC[name]()
  rec = _seg_record(shape)
  moved = []
  for seed in range(6):
    out = op.random_map(rec, np.random.default_rng(seed))
    assert out["label"].dtype == np.uint8 and out["label"].shape == out["image"].shape
    assert set(np.unique(out["label"])) <= {0, 1}
    # Linear (image) and nearest (label) sampling differ only on the boundary.
    assert _dice(out["image"], out["label"]) > 0.93, seed
    moved.append(_dice(out["image"], rec["label"]))
  assert min(moved) < 0.9  # the op did move things, so the check above was not trivial


@pytest.mark.parametrize("name", list(INTENSITY))
def test_intensity_ops_leave_labels_and_spacing_alone(name):
  rec = _seg_record()
  rec["image"] = rec["image"] * np.linspace(0.5, 1.0, 24, dtype=np.float32)[:, None]  # not binary
  out = INTENSITY[name]().random_map(rec, np.random.default_rng(0))
  assert out["label"] is rec["label"] and out["spacing"] is rec["spacing"]
  assert not np.allclose(out["image"], rec["image"])


def test_random_ops_pass_class_labels_through():
  rec = {"image": np.random.default_rng(0).normal(size=(10, 10, 1)).astype(np.float32),
         "label": np.array([1, 0, 1])}
  for make in {**GEOMETRIC, **INTENSITY}.values():
    out = make().random_map(rec, np.random.default_rng(0))
    assert out["label"] is rec["label"]


def test_gamma_keeps_each_channel_range_and_gamma_one_is_identity():
  image = np.random.default_rng(0).uniform([-5.0, 100.0], [5.0, 400.0], (9, 9, 2))
  rec = {"image": image.astype(np.float32)}
  for invert in (False, True):
    out = transforms.RandomGamma(p=1.0, invert=invert).random_map(rec, np.random.default_rng(1))
    img = out["image"]
    np.testing.assert_allclose(img.min((0, 1)), rec["image"].min((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(img.max((0, 1)), rec["image"].max((0, 1)), rtol=1e-5)
    assert not np.allclose(img, rec["image"])
  same = transforms.RandomGamma(gamma=1.0, p=1.0).random_map(rec, np.random.default_rng(1))
  np.testing.assert_allclose(same["image"], rec["image"], rtol=1e-6)
  flat = transforms.RandomGamma(p=1.0).random_map({"image": np.ones((3, 3, 1))},
                                                  np.random.default_rng(0))
  np.testing.assert_array_equal(flat["image"], 1.0)


def test_contrast_clips_to_the_original_range():
  image = np.random.default_rng(0).normal(size=(10, 10, 1)).astype(np.float32)
  op = transforms.RandomContrast(factor=(2.0, 2.0), p=1.0)
  out = op.random_map({"image": image}, np.random.default_rng(0))["image"]
  assert out.min() >= image.min() and out.max() <= image.max()
  np.testing.assert_allclose(out, np.clip((image - image.mean()) * 2 + image.mean(),
                                          image.min(), image.max()), rtol=1e-5, atol=1e-6)


def test_noise_std_and_blur_stays_within_channels():
  zeros = {"image": np.zeros((64, 64, 1), np.float32)}
  out = transforms.RandomNoise(std=0.5, p=1.0).random_map(zeros, np.random.default_rng(0))
  np.testing.assert_allclose(out["image"].std(), 0.5, rtol=0.05)
  image = np.zeros((9, 9, 2), np.float32)
  image[4, 4, 1] = 1.0
  out = transforms.RandomBlur(sigma=1.0, p=1.0).random_map({"image": image},
                                                           np.random.default_rng(0))["image"]
  assert np.all(out[..., 0] == 0)
  np.testing.assert_allclose(out[..., 1].sum(), 1.0, rtol=1e-3)
  assert 0 < out[4, 5, 1] < out[4, 4, 1] < 1


def test_p_zero_skips_random_ops_but_returns_float32():
  rec = {"image": np.arange(16, dtype=np.uint8).reshape(4, 4, 1)}
  for op in [transforms.RandomRotate(p=0.0), transforms.RandomElastic(p=0.0),
             transforms.RandomGamma(p=0.0), transforms.RandomNoise(p=0.0),
             transforms.RandomBlur(p=0.0), transforms.RandomContrast(p=0.0),
             transforms.RandomAffine(p=0.0)]:
    out = op.random_map(rec, np.random.default_rng(0))["image"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, rec["image"])


@pytest.mark.parametrize("make,match", [
    (lambda: transforms.RandomRotate(degrees=-1), "rotate: degrees"),
    (lambda: transforms.RandomRotate(p=1.5), "rotate: probability"),
    (lambda: transforms.RandomElastic(alpha=(5.0, 1.0)), "elastic: alpha"),
    (lambda: transforms.RandomElastic(sigma=(-1.0, 2.0)), "elastic: sigma"),
    (lambda: transforms.RandomGamma(gamma=(0.0, 1.0)), "gamma: gamma"),
    (lambda: transforms.RandomNoise(std=(0.1, 0.2, 0.3)), "noise: std"),
    (lambda: transforms.RandomBlur(sigma=-0.5), "blur: sigma"),
    (lambda: transforms.RandomContrast(factor=(1.2, 0.8)), "contrast: factor"),
    (lambda: transforms.RandomContrast(p=-0.1), "contrast: probability"),
])
def test_random_ops_bad_arguments_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_long_chain_is_deterministic_under_grain_seeds():
  spec = "zscore|flip(axes=(0, 1))|rot90|rotate|elastic(p=0.5)|gamma|noise|blur|contrast"
  ops = transforms.parse(spec)
  records = [_seg_record((16 + k, 16)) for k in range(8)]

  def run(seed):
    ds = grain.MapDataset.source(records)
    for k, op in enumerate(ops):
      ds = ds.random_map(op, seed=seed + k) if isinstance(
          op, grain.transforms.RandomMap) else ds.map(op)
    return [r for r in ds]

  a, b, c = run(3), run(3), run(4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
