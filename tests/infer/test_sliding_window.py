"""Sliding-window inference: exact stitching, blending weights, window layout, one compile, TTA."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.infer import sliding_window as sw

identity = jax.jit(lambda x: x)


def _image(shape, channels=1, seed=0):
  return np.random.default_rng(seed).normal(size=(*shape, channels)).astype(np.float32)


@pytest.mark.parametrize("shape,patch,mirror_axes", [
    ((37, 29, 23), (16, 16, 8), ()),
    ((37, 29, 23), (16, 16, 8), (0, 1, 2)),
    ((45, 31), (16, 12), (0, 1)),
    ((20, 5, 9), (8, 8, 8), (1,)),  # smaller than the patch along axis 1 (padded, cropped back)
    ((3, 7), (8, 8), ()),  # smaller along both axes: a single padded window
])
def test_identity_model_reproduces_the_input(shape, patch, mirror_axes):
  image = _image(shape)
  logits = sw.sliding_window_predict(identity, image, patch, num_classes=1, batch_size=7,
                                     mirror_axes=mirror_axes, return_logits=True, pad_value=-5.0)
  assert logits.shape == image.shape and logits.dtype == np.float32
  np.testing.assert_allclose(logits, image, atol=1e-5)


def test_probabilities_are_the_softmax_of_blended_logits():
  image = _image((19, 14, 10))
  two_class = jax.jit(lambda x: jnp.concatenate([x, -x], axis=-1))
  probs = sw.sliding_window_predict(two_class, image, (8, 8, 8), num_classes=2,
                                    mirror_axes=(0, 2))
  want = np.exp(image) / (np.exp(image) + np.exp(-image))
  np.testing.assert_allclose(probs[..., :1], want, atol=1e-5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("gaussian", [True, False])
def test_constant_model_gives_the_constant_everywhere(gaussian):
  constant = jax.jit(lambda x: jnp.full(x.shape[:-1] + (3,), 2.75, jnp.float32)
                     + jnp.array([0.0, -1.0, 4.0]))
  logits = sw.sliding_window_predict(constant, _image((33, 21, 17), 2), (16, 8, 8), num_classes=3,
                                     overlap=0.3, gaussian=gaussian, return_logits=True)
  np.testing.assert_allclose(logits, np.broadcast_to([2.75, 1.75, 6.75], logits.shape),
                             rtol=1e-6)


def test_blend_weights_positive_everywhere():
  weights = sw.blend_weights((37, 29, 23), (16, 16, 8), overlap=0.5)
  assert weights.shape == (37, 29, 23) and weights.min() >= sw.MIN_WEIGHT
  # Uniform weights count the windows covering each voxel: at least one everywhere.
  counts = sw.blend_weights((37, 29, 23), (16, 16, 8), overlap=0.5, gaussian=False)
  assert counts.min() >= 1 and np.allclose(counts, np.round(counts))


def test_gaussian_importance_map():
  w = sw.gaussian_importance_map((16, 9, 8))
  assert w.shape == (16, 9, 8) and w.dtype == np.float32
  assert w.max() == pytest.approx(1.0) and w.min() == pytest.approx(sw.MIN_WEIGHT)
  for axes in [(0,), (1,), (2,), (0, 1, 2)]:
    np.testing.assert_array_equal(w, np.flip(w, axes))  # centred: mirror-symmetric
  assert w[8, 4, 4] > w[12, 4, 4] > w[15, 4, 4]
  np.testing.assert_allclose(sw.gaussian_importance_map((8, 8), min_weight=1.0), 1.0)


@pytest.mark.parametrize("size,patch,overlap", [
    (37, 16, 0.5), (29, 16, 0.5), (23, 8, 0.5), (16, 16, 0.5), (100, 7, 0.0), (50, 13, 0.9),
    (17, 1, 0.5)])
def test_window_starts_cover_every_voxel(size, patch, overlap):
  (starts,) = sw.window_starts((size,), (patch,), overlap)
  assert starts[0] == 0 and starts[-1] == size - patch
  assert all(b > a for a, b in zip(starts, starts[1:]))
  covered = np.zeros(size, bool)
  for s in starts:
    covered[s:s + patch] = True
  assert covered.all()
  # Neighbours share at least the requested overlap, up to the rounding of the starts.
  assert all(b - a <= patch * (1 - overlap) + 1 for a, b in zip(starts, starts[1:]))


def test_window_starts_nnunet_values_and_errors():
  want = [[0, 7, 14, 21], [0, 6, 13], [0, 4, 8, 11, 15]]  # np.round as nnU-Net: 6.5 -> 6
  assert sw.window_starts((37, 29, 23), (16, 16, 8)) == want
  with pytest.raises(ValueError, match="pad"):
    sw.window_starts((7,), (8,))
  with pytest.raises(ValueError, match="overlap"):
    sw.window_starts((9,), (8,), overlap=1.0)


def test_apply_fn_compiles_once_per_batch_size_and_runs_no_padding_windows():
  traces, calls = [], []

  @jax.jit
  def model(x):
    traces.append(x.shape[0])  # runs at trace time only
    return jnp.concatenate([x, 2 * x], axis=-1)

  def counted(x):
    calls.append(x.shape[0])
    return model(x)

  # 60 windows: 8 batches of 7 and one of 4; 12 windows: 7 and 5; again: nothing new to trace.
  for shape in [(37, 29, 23), (30, 17, 9), (30, 17, 9)]:
    sw.sliding_window_predict(counted, _image(shape), (16, 16, 8), num_classes=2, batch_size=7)
  assert traces == [7, 4, 5]
  assert calls == [7] * 8 + [4] + [7, 5] * 2


def test_batch_multiple_pads_the_last_batch():
  calls = []

  def model(x):
    calls.append(x.shape[0])
    return jnp.concatenate([x, 2 * x], axis=-1)

  image = _image((30, 17, 9))  # 12 windows
  want = sw.sliding_window_predict(model, image, (16, 16, 8), num_classes=2, batch_size=8)
  got = sw.sliding_window_predict(model, image, (16, 16, 8), num_classes=2, batch_size=8,
                                  batch_multiple=4)
  assert calls == [8, 4, 8, 4]  # 4 windows left over: no padding needed
  np.testing.assert_array_equal(got, want)
  calls.clear()
  sw.sliding_window_predict(model, image, (16, 16, 8), num_classes=2, batch_size=9,
                            batch_multiple=3)
  assert calls == [9, 3]  # 3 left over
  calls.clear()
  sw.sliding_window_predict(model, image, (16, 16, 8), num_classes=2, batch_size=10,
                            batch_multiple=5)
  assert calls == [10, 5]  # 2 left over, padded to 5
  with pytest.raises(ValueError, match="must divide"):
    sw.sliding_window_predict(model, image, (16, 16, 8), num_classes=2, batch_size=8,
                              batch_multiple=3)


def test_wrong_output_shape_is_reported():
  with pytest.raises(ValueError, match="apply_fn returned"):
    sw.sliding_window_predict(identity, _image((9, 9)), (8, 8), num_classes=2)


@pytest.mark.parametrize("mirror_axes", [(0,), (1,), (0, 1)])
def test_mirror_tta_averages_unflipped_outputs(mirror_axes):
  # A model that is not flip-equivariant: f(x) = x * a + b with position-dependent a, b.
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(2, 6, 5, 1)).astype(np.float32)
  model = jax.jit(lambda x: x * a + b)
  image = _image((6, 5))
  flips = [axes for r in range(len(mirror_axes) + 1)
           for axes in itertools.combinations(mirror_axes, r)]
  # Flipping the input, applying f and flipping back gives x * flip(a) + flip(b).
  want = np.mean([image * np.flip(a, f) + np.flip(b, f) for f in flips], axis=0)
  got = sw.sliding_window_predict(model, image, (6, 5), num_classes=1, batch_size=2,
                                  mirror_axes=mirror_axes, return_logits=True)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(got, image * a + b, atol=1e-3)


@pytest.mark.parametrize("shape,mirror_axes,return_logits", [
    ((37, 29, 23), (), True),
    ((37, 29, 23), (0, 2), False),
    ((37, 11, 23), (1,), True),  # shorter than the patch along axis 1: padded, cropped back
])
def test_blending_on_the_device_equals_blending_on_the_host(shape, mirror_axes, return_logits):
  rng = np.random.default_rng(5)
  a = rng.normal(size=(16, 16, 8, 1)).astype(np.float32)
  model = jax.jit(lambda x: jnp.concatenate([x * a, x - a, jnp.sin(x)], axis=-1))
  image = _image(shape)
  kwargs = dict(batch_size=3, mirror_axes=mirror_axes, return_logits=return_logits,
                overlap=0.4)
  host = sw.sliding_window_predict(model, image, (16, 16, 8), 3, blend_on_device=False, **kwargs)
  device = sw.sliding_window_predict(model, image, (16, 16, 8), 3, blend_on_device=True, **kwargs)
  auto = sw.sliding_window_predict(model, image, (16, 16, 8), 3, **kwargs)
  assert device.shape == image.shape[:-1] + (3,)
  np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(auto, device)  # on the CPU, the default is the device


def test_where_the_blend_happens():
  one = jnp.zeros((2, 3))
  assert sw._blends_on_device(one, nbytes=10**12)  # the host's CPU: host memory either way
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  split = jax.device_put(jnp.zeros((2, 3)),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  assert not sw._blends_on_device(split, nbytes=1)
  model = jax.jit(lambda x: jnp.concatenate([x, x], axis=-1),
                  out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  image = _image((20, 20))
  got = sw.sliding_window_predict(model, image, (8, 8), 2, batch_size=2)  # auto: the host
  want = sw.sliding_window_predict(jax.jit(lambda x: jnp.concatenate([x, x], axis=-1)), image,
                                   (8, 8), 2, batch_size=2, blend_on_device=False)
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="one device"):
    sw.sliding_window_predict(model, image, (8, 8), 2, batch_size=2, blend_on_device=True)


def test_the_result_is_a_writable_array():
  probs = sw.sliding_window_predict(identity, _image((9, 9), 2), (8, 8), num_classes=2)
  probs[0, 0] = 0.0  # callers post-process in place
