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


class _Channels(_Source):
  """Two-channel 2-D records; every fourth has a flat second channel."""

  def __init__(self, n, size=7):
    rng = np.random.default_rng(1)
    self.images = rng.normal(size=(n, size, size, 2)).astype(np.float32)
    self.images[::4, ..., 1] = 0.5


class _Fixed:
  """A stand-in for Grain's generator that makes a host op take given draws: ``random()`` 0
  (applied; `_sample_around_one`'s lower half), ``uniform`` the listed values in turn."""

  def __init__(self, *uniform):
    self.values = list(uniform)

  def random(self):
    return 0.0

  def uniform(self, lo=0.0, hi=1.0, size=None):
    return self.values.pop(0)


def _device_batch(source, chain, batch):
  feed = _feed(source, chain, batch=batch, steps=1)
  # Blur and the warps jitted, as in the train step: op by op, each vmapped step would compile
  # on its own (seconds); the rest is quicker eagerly.
  run = jax.jit(feed.batch) if chain.startswith(("blur", "rotate", "elastic")) else feed.batch
  got = np.asarray(run(feed.arrays, feed.indices, np.int32(0))["image"])
  return got, source.images[np.asarray(feed.indices[0])]


def _host(op, image, rng=None):
  return op.random_map({"image": image}, rng or np.random.default_rng(0))["image"]


@pytest.mark.parametrize("chain", ["gamma(gamma=1.4, p=1.0)", "gamma(gamma=0.6, p=1.0)",
                                   "gamma(gamma=0.8, p=1.0, invert=True)",
                                   "contrast(factor=1.3, p=1.0)", "contrast(factor=0.6, p=1.0)",
                                   "blur(sigma=0.8, p=1.0)", "blur(sigma=2.6, p=1.0)",
                                   "blur(sigma=0.0, p=1.0)", "noise(std=0.0, p=1.0)"])
def test_twins_compute_as_their_host_op_for_a_fixed_draw(chain):
  # A range of zero width fixes the draw on both sides: the results must then be the same maths.
  (op,) = transforms.parse(chain)
  got, host = _device_batch(_Channels(8), chain, 8)
  for g, h in zip(got, host):
    np.testing.assert_allclose(g, _host(op, h), rtol=1e-5, atol=1e-5)
    assert g.dtype == np.float32
  assert not np.allclose(got, host) or chain.startswith(("noise", "blur(sigma=0.0"))


def test_blur_is_scipys_gaussian_filter_per_image_sigma():
  from scipy import ndimage

  rng = np.random.default_rng(2)
  for shape in ((4, 9, 8, 2), (4, 5, 6, 7, 1)):
    images = rng.normal(size=shape).astype(np.float32)
    sigma = np.array([0.0, 0.5, 1.3, 2.9], np.float32)  # 2.9: a kernel wider than the image
    got = jax.jit(lambda x, s: device.blur_images(x, device.gaussian_kernels(s, radius=12)))(
        images, sigma)
    for g, x, s in zip(np.asarray(got), images, sigma):
      want = ndimage.gaussian_filter(x, (s,) * (x.ndim - 1) + (0,), mode="nearest")
      np.testing.assert_allclose(g, want, rtol=0, atol=1e-5)


def test_gamma_draws_per_image_half_below_one_at_its_rate():
  source = _Source(64, size=5)
  source.images = np.broadcast_to(np.linspace(0, 1, 25, dtype=np.float32).reshape(1, 5, 5, 1),
                                  (64, 5, 5, 1)).copy()
  got, host = _device_batch(source, "gamma(gamma=(0.5, 2.0), p=1.0)", 64)
  # x in [0, 1] with min 0 and max 1 maps to x ** g: recover g from one pixel.
  g = np.log(got[:, 2, 2, 0]) / np.log(host[:, 2, 2, 0])
  assert np.all((g >= 0.5 - 1e-4) & (g <= 2.0 + 1e-4)), g
  assert 0.3 < np.mean(g < 1) < 0.7 and len(np.unique(np.round(g, 5))) == 64
  got, host = _device_batch(source, "gamma(gamma=(0.5, 2.0), p=0.5)", 64)
  assert 0.3 < np.mean([not np.allclose(a, b) for a, b in zip(got, host)]) < 0.7


def test_contrast_draws_per_image_half_below_one_at_its_rate():
  source = _Source(64)
  got, host = _device_batch(source, "contrast(factor=(0.5, 1.5), p=1.0)", 64)
  f = []
  for g, h in zip(got, host):  # the pixel nearest the mean is never clipped
    mean = h.astype(np.float64).mean()
    i = np.argsort(np.abs(h - mean), axis=None)[1]
    f.append((g.flat[i] - mean) / (h.flat[i] - mean))
    assert g.min() >= h.min() - 1e-6 and g.max() <= h.max() + 1e-6  # clipped to the range
  f = np.array(f)
  assert np.all((f >= 0.5 - 1e-3) & (f <= 1.5 + 1e-3)), f
  assert 0.3 < np.mean(f < 1) < 0.7 and len(np.unique(np.round(f, 4))) > 60
  got, host = _device_batch(source, "contrast(factor=(0.5, 1.5), p=0.5)", 64)
  assert 0.3 < np.mean([not np.allclose(a, b) for a, b in zip(got, host)]) < 0.7


def test_noise_draws_its_std_per_image_at_its_rate():
  source = _Source(64, size=16)
  got, host = _device_batch(source, "noise(std=(0.1, 0.3), p=1.0)", 64)
  residual = (got - host).reshape(64, -1)
  std = residual.std(axis=1)
  assert np.all((std > 0.1 * 0.8) & (std < 0.3 * 1.2)), std  # 256 samples: within ~20%
  assert abs(residual.mean()) < 0.01 and np.corrcoef(std[:-1], std[1:])[0, 1] < 0.5
  assert 0.04 < std.std() < 0.08  # a uniform std over [0.1, 0.3] spreads by 0.058
  got, host = _device_batch(source, "noise(std=(0.1, 0.3), p=0.25)", 64)
  assert 0.1 < np.mean([not np.allclose(a, b) for a, b in zip(got, host)]) < 0.4


def test_rot90_turns_each_image_by_its_own_quarter_turns():
  from medjax.data import augment

  rng = np.random.default_rng(3)
  images = rng.random((4, 5, 6, 5, 1), dtype=np.float32)
  got = np.asarray(device.rot90_images(images, np.array([0, 1, 2, 3]), (2, 0)))
  for k, (g, x) in enumerate(zip(got, images)):
    np.testing.assert_array_equal(g, np.rot90(x, k, (2, 0)))
  with pytest.raises(ValueError, match="square plane"):
    device.rot90_images(images, np.zeros(4, np.int32), (0, 1))
  source = _Source(64)
  for p in (1.0, 0.5):
    got, host = _device_batch(source, f"rot90(axes=(0, 1), p={p})", 64)
    turns = np.array([[np.array_equal(g, np.rot90(h, k)) for k in range(4)]
                      for g, h in zip(got, host)])
    assert np.all(turns.sum(axis=1) == 1)  # each image exactly one of its four turns
    share = turns.mean(axis=0)
    if p == 1.0:
      assert share[0] == 0 and all(0.15 < s < 0.5 for s in share[1:]), share
    else:
      assert 0.3 < share[0] < 0.7, share
  # Host op, same draw: as the device.
  host = augment.RandomRot90(axes=(0, 1), p=1.0)
  record = {"image": images[0, :, 0]}
  rng = np.random.default_rng(5)
  want = host.random_map(record, rng)["image"]
  k = next(k for k in (1, 2, 3) if np.array_equal(want, np.rot90(images[0, :, 0], k)))
  np.testing.assert_array_equal(
      np.asarray(device.rot90_images(images[:1, :, 0], np.array([k]), (0, 1)))[0], want)


def test_rot90_on_the_device_needs_square_planes_and_no_spacing_to_swap():
  chain = transforms.parse("rot90(axes=(0, 1))")
  assert device.problems(_Source(4), chain) == []

  class Wide(_Source):
    def __getitem__(self, i):
      return {"image": np.zeros((4, 6, 1), np.float32), "label": np.int32(0)}

  class Spaced(_Source):
    def __getitem__(self, i):
      return {**super().__getitem__(i), "spacing": np.array([1.0, 2.0])}

  assert "not square" in " ".join(device.problems(Wide(4), chain))
  assert "unequal spacings" in " ".join(device.problems(Spaced(4), chain))
  # A host crop to a square plane first makes it square.
  assert device.problems(Wide(4), transforms.parse("crop_or_pad(shape=(4, 4))|rot90")) == []


def test_rotate_turns_as_the_host_op_and_draws_per_image():
  from medjax.data import augment

  rng = np.random.default_rng(4)
  for shape, degrees in (((9, 7, 2), (25.0,)), ((6, 7, 5, 1), (20.0, -10.0, 15.0))):
    image = rng.random(shape, dtype=np.float32)
    want = _host(augment.RandomRotate(degrees=30.0, p=1.0), image, _Fixed(*degrees))
    matrix = device.rotation_matrix(len(shape) - 1, np.deg2rad(np.float32(degrees)))
    got = jax.jit(device.warp_about_centre)(image, matrix, np.zeros(len(shape) - 1, np.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # A bright point 5 voxels from the centre: its turn about the centre is the drawn angle.
  source = _Source(32, size=15)
  source.images[:] = 0
  source.images[:, 7, 12, 0] = 1
  got, _ = _device_batch(source, "rotate(degrees=30, p=1.0)", 32)
  rows, cols = np.indices((15, 15)) - 7
  mass = got[..., 0].sum(axis=(1, 2))
  angles = np.rad2deg(np.arctan2((got[..., 0] * rows).sum(axis=(1, 2)) / mass,
                                 (got[..., 0] * cols).sum(axis=(1, 2)) / mass))
  assert np.all(np.abs(angles) <= 30 + 1.0), angles
  assert np.mean(angles < 0) > 0.2 and np.mean(angles > 0) > 0.2 and np.std(angles) > 10
  got, host = _device_batch(source, "rotate(degrees=30, p=0.5)", 32)
  assert 0.25 < np.mean([not np.allclose(a, b) for a, b in zip(got, host)]) < 0.75


def test_elastic_deforms_as_the_host_op_for_given_draws():
  from medjax.data import augment

  # 2-D only, to keep the compile short: the 3-D path is the same code (blur, map_coordinates).
  rng = np.random.default_rng(6)
  image = rng.random((20, 17, 2), dtype=np.float32)
  alpha, sigma = 150.0, 4.0
  noise = [rng.uniform(-1, 1, size=(20, 17)) for _ in range(2)]  # one field per spatial axis
  want = _host(augment.RandomElastic(p=1.0), image, _Fixed(alpha, sigma, *noise))
  # A kernel laid on more taps than its cut-off: the taps beyond it must weigh nothing.
  kernels = device.gaussian_kernels(np.float32([sigma]), radius=int(4 * sigma + 0.5) + 3)
  got = jax.jit(device.elastic_images)(image[None], np.float32([alpha]), kernels,
                                       np.stack(noise, -1)[None].astype(np.float32))
  np.testing.assert_allclose(np.asarray(got)[0], want, rtol=0, atol=1e-5)
  assert not np.allclose(want, image, atol=0.1)


def test_elastic_draws_per_image_at_its_rate():
  source = _Source(32, size=12)
  got, host = _device_batch(source, "elastic(alpha=(20, 40), sigma=(2, 3), p=0.5)", 32)
  changed = np.array([not np.allclose(a, b) for a, b in zip(got, host)])
  assert 0.25 <= changed.mean() <= 0.75, changed.mean()
  # Resampled linearly within each image's range, each image its own field.
  assert all(g.min() >= h.min() - 1e-6 and g.max() <= h.max() + 1e-6 for g, h in zip(got, host))
  assert len({np.round(g.sum(), 4) for g in got[changed]}) == changed.sum()


class _Segmentation(_Source):
  def __getitem__(self, i):
    return {"image": self.images[i], "label": (self.images[i] > 0.5).astype(np.int32)}


def test_what_cannot_run_on_the_device_is_named():
  # Every augmentation has a twin; a shape-changing op after a random one has none.
  chain = transforms.parse("to_float|elastic|crop_or_pad(shape=(4, 4))")
  assert device.unsupported(chain) == ["CropOrPad"]
  with pytest.raises(ValueError, match="CropOrPad has no on-device version.*on_device='off'"):
    _feed(_Source(8), "to_float|elastic|crop_or_pad(shape=(4, 4))")
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
  assert not device.wanted("auto", source, transforms.parse("flip|crop_or_pad(shape=(4, 4))"),
                           "gpu", 10**9)
  assert not device.wanted("auto", _Segmentation(8), chain, "gpu", 10**9)
  assert device.wanted("on", source, chain, "cpu", None)
  assert not device.wanted("off", source, chain, "gpu", 10**9)
  with pytest.raises(ValueError, match="data.on_device='yes'"):
    device.wanted("yes", source, chain, "cpu", None)
