"""The on-device training data (medjax.data.device): Grain's batch order, the device twins of
the transforms, and when a run chooses it."""

import jax
import numpy as np
import pytest

from medjax.data import device, pipeline, transforms


class _Source:
  """Records whose image encodes their index (2-D, 1 channel)."""

  def __init__(self, n, size=6):
    self.images = np.random.default_rng(0).random((n, size, size, 1), dtype=np.float32)
    self.images[:, 0, 0, 0] = np.arange(n)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": np.int32(i % 2)}


def _feed(source, chain, batch=4, steps=7, seed=3):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return device.build(source, transforms.parse(chain), batch_size=batch, seed=seed, steps=steps,
                      sharding=sharding)


def test_batches_are_grains_for_the_same_seed():
  source, chain = _Source(10), "normalize(0.25, 2.0)"
  feed = _feed(source, chain)
  grain_iter = iter(pipeline.train_dataset(source, transforms.parse(chain), global_batch_size=4,
                                           seed=3, num_threads=1, prefetch=0))
  for step in range(7):  # 7 batches of 4 over 10 records: three epochs, three permutations
    expected = next(grain_iter)
    got = jax.device_get(feed.batch(feed.arrays, feed.indices, np.int32(step)))
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_allclose(got["image"], expected["image"], rtol=0, atol=1e-6)
  epochs = np.asarray(feed.indices)[:5].reshape(-1)[:20].reshape(2, 10)
  assert all(sorted(e) == list(range(10)) for e in epochs)  # each epoch a permutation
  assert not np.array_equal(epochs[0], epochs[1])


def test_random_flip_flips_whole_images_at_its_rate():
  source, flips = _Source(64), []
  for p in (0.0, 1.0, 0.5):
    feed = _feed(source, f"flip(axes=(0,), p={p})", batch=64, steps=1)
    got = np.asarray(feed.batch(feed.arrays, feed.indices, np.int32(0))["image"])
    host = source.images[np.asarray(feed.indices[0])]
    flipped = np.array([np.array_equal(g, h[::-1]) for g, h in zip(got, host)])
    kept = np.array([np.array_equal(g, h) for g, h in zip(got, host)])
    assert np.all(flipped | kept)
    flips.append(flipped.mean())
  assert flips[0] == 0.0 and flips[1] == 1.0 and 0.3 < flips[2] < 0.7, flips


def test_affine_warps_as_the_host_op_and_draws_per_image():
  from medjax.data import spatial

  rng = np.random.default_rng(1)
  for shape in ((9, 7, 2), (6, 7, 5, 1)):
    image = rng.random(shape, dtype=np.float32)
    nd = len(shape) - 1
    matrix = spatial._random_rotation(nd, rng, 30.0) / 1.1
    shift = rng.uniform(-1.5, 1.5, size=nd)
    host = spatial._about_centre({"image": image}, matrix, shift)["image"]
    got = device.warp_about_centre(image, np.float32(matrix), np.float32(shift))
    np.testing.assert_allclose(np.asarray(got), host, atol=1e-5)
  source = _Source(16)
  for p, changed in ((0.0, 0), (1.0, 16)):
    feed = _feed(source, f"affine(rotate=20, scale=0.1, translate=0.1, p={p})", batch=16, steps=1)
    got = np.asarray(feed.batch(feed.arrays, feed.indices, np.int32(0))["image"])
    host = source.images[np.asarray(feed.indices[0])]
    assert sum(not np.allclose(g, h) for g, h in zip(got, host)) == changed
  assert len({np.round(g.sum(), 4) for g in got}) == 16  # each image its own warp


def test_intensity_scales_and_shifts_each_image_within_its_ranges():
  source = _Source(32)
  for p, changed in ((0.0, 0), (1.0, 32)):
    feed = _feed(source, f"intensity(brightness=0.2, contrast=0.3, p={p})", batch=32, steps=1)
    got = np.asarray(feed.batch(feed.arrays, feed.indices, np.int32(0))["image"])
    host = source.images[np.asarray(feed.indices[0])]
    assert sum(not np.allclose(g, h) for g, h in zip(got, host)) == changed
  for g, h in zip(got, host):  # g = h * c + b: recover c and b from two pixels
    c = (g.flat[1] - g.flat[2]) / (h.flat[1] - h.flat[2])
    b = g.flat[1] - h.flat[1] * c
    np.testing.assert_allclose(g, h * c + b, rtol=1e-4, atol=1e-4)
    assert 0.7 - 1e-4 <= c <= 1.3 + 1e-4 and abs(b) <= 0.2 + 1e-4


class _Segmentation(_Source):
  def __getitem__(self, i):
    return {"image": self.images[i], "label": (self.images[i] > 0.5).astype(np.int32)}


def test_what_cannot_run_on_the_device_is_named():
  chain = transforms.parse("to_float|rot90|normalize(0.5, 0.5)")
  assert device.unsupported(chain) == ["RandomRot90"]
  with pytest.raises(ValueError, match="RandomRot90 has no on-device version.*on_device='off'"):
    _feed(_Source(8), "to_float|rot90|normalize(0.5, 0.5)")
  # Deterministic ops before the first random one run on the host: no twin needed.
  assert device.unsupported(transforms.parse("crop_or_pad(shape=(4, 4))|flip")) == []
  # Label maps would not follow a flip on the device.
  with pytest.raises(ValueError, match="labels are maps on the image grid"):
    device.wanted("on", _Segmentation(8), transforms.parse("flip"), "gpu", 10**9)
  assert device.wanted("on", _Segmentation(8), transforms.parse("normalize"), "gpu", 10**9)


def test_auto_keeps_the_cpu_on_grain_and_takes_what_fits_elsewhere():
  source, chain = _Source(10), transforms.parse("flip")
  size = device.split_bytes(source, chain)
  assert size == 10 * (6 * 6 * 4 + 4)
  assert not device.wanted("auto", source, chain, "cpu", None)
  assert device.wanted("auto", source, chain, "gpu", 4 * size)
  assert not device.wanted("auto", source, chain, "gpu", 4 * size - 4)  # over a quarter
  assert not device.wanted("auto", source, transforms.parse("rot90"), "gpu", 10**9)
  assert not device.wanted("auto", _Segmentation(8), chain, "gpu", 10**9)
  assert device.wanted("on", source, chain, "cpu", None)
  assert not device.wanted("off", source, chain, "gpu", 10**9)
  with pytest.raises(ValueError, match="data.on_device='yes'"):
    device.wanted("yes", source, chain, "cpu", None)
