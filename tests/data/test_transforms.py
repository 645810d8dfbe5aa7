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
