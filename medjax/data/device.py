"""Training data kept in accelerator memory: the whole split uploaded once, each step's batch
gathered and augmented inside the jitted train step, so the host does nothing per step.

For splits that fit (MedMNIST, 2-D slices). The batches hold the records the Grain pipeline
(`medjax.data.pipeline.train_dataset`) would give for the same seed, in the same order: the
index of every record of every step comes from Grain's own shuffle, computed once for the run.
The deterministic transforms before the first random one run once on the host when the split is
uploaded; the rest run on the device, where each op has a JAX twin here (`DEVICE_OPS`: every
augmentation of `medjax.data.augment` — flip, rot90, affine, rotate, elastic, intensity, gamma,
contrast, noise, blur — and normalize, to_float). A random op on the device draws from
``jax.random`` (keyed by seed, step and op; each image its own draw), not from the generator Grain
passes to its host twin: the same distribution and the same maths, not the same draws. Where the
host op is float64 (gamma, contrast, elastic's field) its twin is float32 (agreement to ~1e-5).
rot90's twin needs a square plane (a batch keeps one shape) and no unequal spacing to swap
(`problems` says so). The position in the stream is the train state's step, so a checkpoint of
the state is a checkpoint of the data too.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from medjax.data import augment, transforms

# A device op: (key, images [B, *spatial, C]) -> images. Keys are per op and per step.
DeviceOp = Callable[[jax.Array, jax.Array], jax.Array]


def _flip(op: augment.RandomFlip) -> DeviceOp:
  def apply(key, images):
    nd = images.ndim - 2
    for a in op.axes:
      if not -nd <= a < nd:
        raise ValueError(f"flip axis {a} out of range for a {nd}-D image")
    draws = jax.random.uniform(key, (images.shape[0], len(op.axes)))
    for j, a in enumerate(op.axes):
      flip = (draws[:, j] < op.p).reshape((-1,) + (1,) * (images.ndim - 1))
      images = jnp.where(flip, jnp.flip(images, axis=1 + a % nd), images)
    return images

  return apply


def rotation_matrix(nd: int, thetas: jax.Array) -> jax.Array:
  """As `medjax.data.spatial._random_rotation` for given angles (radians, one per plane of the
  spatial axes in ``itertools.combinations`` order): the planes' rotations multiplied."""
  matrix = jnp.eye(nd)
  for (a, b), theta in zip(itertools.combinations(range(nd), 2), thetas):
    r = jnp.eye(nd).at[a, a].set(jnp.cos(theta)).at[b, b].set(jnp.cos(theta))
    matrix = matrix @ r.at[a, b].set(-jnp.sin(theta)).at[b, a].set(jnp.sin(theta))
  return matrix


def _rotation(key: jax.Array, nd: int, degrees: float) -> jax.Array:
  """One uniform ``[-degrees, degrees]`` rotation per plane, multiplied (`rotation_matrix`)."""
  planes = nd * (nd - 1) // 2
  return rotation_matrix(nd, jnp.deg2rad(jax.random.uniform(key, (planes,), minval=-degrees,
                                                            maxval=degrees)))


def warp_about_centre(image: jax.Array, matrix: jax.Array, shift: jax.Array) -> jax.Array:
  """`medjax.data.spatial._about_centre` on one image ``[*spatial, C]``: output voxel ``o``
  samples ``matrix @ (o - centre) + centre - shift``, linearly, edges padded with the nearest
  value."""
  nd = image.ndim - 1
  centre = (jnp.asarray(image.shape[:nd], jnp.float32) - 1) / 2
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in image.shape[:nd]],
                                indexing="ij"))
  coords = jnp.tensordot(matrix, grid, axes=1) + (centre - matrix @ centre - shift).reshape(
      (nd,) + (1,) * nd)
  return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], list(coords), order=1,
                                                      mode="nearest")
                    for c in range(image.shape[-1])], axis=-1)


def _affine(op: augment.RandomAffine) -> DeviceOp:
  """As `augment.RandomAffine` (rotation per plane, isotropic scale and shift about the centre,
  applied with probability ``p``), each image its own draw."""

  def one(key, image):
    nd = image.ndim - 1
    k_apply, k_rot, k_scale, k_shift = jax.random.split(key, 4)
    matrix = _rotation(k_rot, nd, op.rotate) / jax.random.uniform(
        k_scale, minval=1 - op.scale, maxval=1 + op.scale)
    shift = jax.random.uniform(k_shift, (nd,), minval=-op.translate, maxval=op.translate) * \
        jnp.asarray(image.shape[:nd], jnp.float32)
    image = image.astype(jnp.float32)
    return jnp.where(jax.random.uniform(k_apply) < op.p,
                     warp_about_centre(image, matrix, shift), image)

  return lambda key, images: jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def _intensity(op: augment.RandomIntensity) -> DeviceOp:
  """As `augment.RandomIntensity`: ``x * c + b`` per image, with probability ``p``."""

  def apply(key, images):
    k_apply, k_c, k_b = jax.random.split(key, 3)
    shape = (images.shape[0],) + (1,) * (images.ndim - 1)
    c = jax.random.uniform(k_c, shape, minval=1 - op.contrast, maxval=1 + op.contrast)
    b = jax.random.uniform(k_b, shape, minval=-op.brightness, maxval=op.brightness)
    return jnp.where(jax.random.uniform(k_apply, shape) < op.p, images * c + b, images)

  return apply


def _applied(key: jax.Array, p: float, images: jax.Array) -> jax.Array:
  """``[B, 1, ..., 1]`` booleans: which images an op with probability ``p`` changes."""
  return jax.random.uniform(key, (images.shape[0],) + (1,) * (images.ndim - 1)) < p


def _per_image(images: jax.Array, values: jax.Array) -> jax.Array:
  """``values`` ``[B]`` shaped to broadcast against ``images`` ``[B, *spatial, C]``."""
  return values.reshape((-1,) + (1,) * (images.ndim - 1))


def _uniform(key: jax.Array, n: int, lo: float, hi: float) -> jax.Array:
  return jax.random.uniform(key, (n,), minval=lo, maxval=hi)


def sample_around_one(key: jax.Array, n: int, lo: float, hi: float) -> jax.Array:
  """``n`` draws by `medjax.data.spatial._sample_around_one`'s rule (nnU-Net's): when ``lo < 1``,
  half from ``[lo, min(hi, 1))`` and half from ``[max(lo, 1), hi)`` (or ``[lo, hi)`` when
  ``hi < 1``)."""
  k_half, k_below, k_above = jax.random.split(key, 3)
  above = _uniform(k_above, n, max(lo, 1.0), hi) if hi >= 1 else _uniform(k_above, n, lo, hi)
  if not lo < 1:
    return above
  below = _uniform(k_below, n, lo, min(hi, 1.0))
  return jnp.where(jax.random.uniform(k_half, (n,)) < 0.5, below, above)


def gamma_images(images: jax.Array, gamma: jax.Array, invert: bool) -> jax.Array:
  """`augment.RandomGamma`'s maths, ``gamma`` per image: each channel rescaled to [0, 1], raised
  to its image's gamma, mapped back (a flat channel maps to itself); ``invert`` on ``-x``."""
  sign = -1.0 if invert else 1.0
  x = sign * images.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  lo = x.min(axis=axes, keepdims=True)
  span = x.max(axis=axes, keepdims=True) - lo
  safe = jnp.where(span > 0, span, 1.0)
  return sign * (((x - lo) / safe) ** _per_image(x, gamma) * safe + lo)


def _gamma(op: augment.RandomGamma) -> DeviceOp:
  def apply(key, images):
    k_apply, k_gamma = jax.random.split(key)
    gamma = sample_around_one(k_gamma, images.shape[0], *op.gamma)
    return jnp.where(_applied(k_apply, op.p, images), gamma_images(images, gamma, op.invert),
                     images.astype(jnp.float32))

  return apply


def contrast_images(images: jax.Array, factor: jax.Array) -> jax.Array:
  """`augment.RandomContrast`'s maths, ``factor`` per image: each channel scaled about its mean,
  then clipped to its own range."""
  x = images.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  mean = x.mean(axis=axes, keepdims=True)
  return jnp.clip((x - mean) * _per_image(x, factor) + mean, x.min(axis=axes, keepdims=True),
                  x.max(axis=axes, keepdims=True))


def _contrast(op: augment.RandomContrast) -> DeviceOp:
  def apply(key, images):
    k_apply, k_factor = jax.random.split(key)
    factor = sample_around_one(k_factor, images.shape[0], *op.factor)
    return jnp.where(_applied(k_apply, op.p, images), contrast_images(images, factor),
                     images.astype(jnp.float32))

  return apply


def _noise(op: augment.RandomNoise) -> DeviceOp:
  """As `augment.RandomNoise`: ``x + std * N(0, 1)``, ``std`` uniform per image."""

  def apply(key, images):
    k_apply, k_std, k_noise = jax.random.split(key, 3)
    images = images.astype(jnp.float32)
    std = _per_image(images, _uniform(k_std, images.shape[0], *op.std))
    noisy = images + std * jax.random.normal(k_noise, images.shape, jnp.float32)
    return jnp.where(_applied(k_apply, op.p, images), noisy, images)

  return apply


def rot90_images(images: jax.Array, k: jax.Array, axes: tuple[int, int]) -> jax.Array:
  """Each image ``[B, *spatial, C]`` turned by its own ``k`` (``[B]``, 0-3) quarter turns in the
  plane of spatial ``axes``, as ``np.rot90(image, k, axes)``; the plane must be square (a batch
  keeps one shape)."""
  nd = images.ndim - 2
  if not (all(-nd <= ax < nd for ax in axes) and axes[0] % nd != axes[1] % nd):
    raise ValueError(f"rot90 axes {axes} do not name a plane of the {nd}-D image")
  a, b = (1 + ax % nd for ax in axes)
  if images.shape[a] != images.shape[b]:
    raise ValueError(f"rot90 on the device needs a square plane, got {images.shape[1:-1]} "
                     f"with axes {axes}")
  out = images
  for turns in (1, 2, 3):
    out = jnp.where(_per_image(images, k == turns), jnp.rot90(images, turns, (a, b)), out)
  return out


def _rot90(op: augment.RandomRot90) -> DeviceOp:
  """As `augment.RandomRot90`: with probability ``p``, 1, 2 or 3 quarter turns (uniformly)."""

  def apply(key, images):
    k_apply, k_turns = jax.random.split(key)
    k = jax.random.randint(k_turns, (images.shape[0],), 1, 4)
    k = jnp.where(jax.random.uniform(k_apply, (images.shape[0],)) < op.p, k, 0)
    return rot90_images(images, k, op.axes)

  return apply


def gaussian_kernels(sigma: jax.Array, radius: int) -> jax.Array:
  """``[B, 2 * radius + 1]``: per image, scipy's ``gaussian_filter`` kernel for its ``sigma``
  (normalised, cut at ``int(4 * sigma + 0.5)`` taps each side, as scipy's ``truncate=4``) laid on
  ``radius`` taps each side; ``sigma = 0`` is the identity."""
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sigma = sigma[:, None].astype(jnp.float32)
  cut = jnp.floor(4.0 * sigma + 0.5)
  safe = jnp.where(sigma > 0, sigma, 1.0)
  w = jnp.where(sigma > 0, jnp.exp(-0.5 * (x / safe) ** 2), (x == 0).astype(jnp.float32))
  w = jnp.where(jnp.abs(x) <= cut, w, 0.0)
  return w / w.sum(axis=1, keepdims=True)


def _filter_matrices(kernels: jax.Array, n: int, mode: str) -> jax.Array:
  """``[B, n, n]``: each image's 1-D filter along an axis of ``n`` as a matrix, the edges folded
  in as scipy's ``mode`` pads them (``nearest``: the end voxel repeated; ``constant``: 0)."""
  radius = (kernels.shape[1] - 1) // 2
  source = jnp.arange(n)[:, None] + jnp.arange(2 * radius + 1)[None, :] - radius  # [n, taps]
  if mode == "nearest":
    source = jnp.clip(source, 0, n - 1)
  elif mode != "constant":
    raise ValueError(f"filter mode {mode!r}: expected 'nearest' or 'constant'")
  onehot = (source[..., None] == jnp.arange(n)).astype(jnp.float32)  # outside: all zero
  return jnp.einsum("bt,itj->bij", kernels, onehot, precision=jax.lax.Precision.HIGHEST)


def blur_images(images: jax.Array, kernels: jax.Array, mode: str = "nearest") -> jax.Array:
  """Separable filter of each image ``[B, *spatial, C]`` with its own 1-D kernel
  (``[B, 2r + 1]``) along every spatial axis, edges as scipy's ``mode`` (``nearest`` or
  ``constant``, 0): scipy's ``gaussian_filter`` with `gaussian_kernels`. Each axis is one batched
  matrix product (full float32 precision, not the accelerator's reduced default)."""
  x = images.astype(jnp.float32)
  for axis in range(1, x.ndim - 1):
    matrices = _filter_matrices(kernels, x.shape[axis], mode)
    x = jnp.moveaxis(jnp.einsum("b...j,bij->b...i", jnp.moveaxis(x, axis, -1), matrices,
                                precision=jax.lax.Precision.HIGHEST), -1, axis)
  return x


def _blur(op: augment.RandomBlur) -> DeviceOp:
  """As `augment.RandomBlur`: Gaussian blur over the spatial axes, ``sigma`` uniform per image."""
  radius = int(4.0 * op.sigma[1] + 0.5)

  def apply(key, images):
    k_apply, k_sigma = jax.random.split(key)
    sigma = _uniform(k_sigma, images.shape[0], *op.sigma)
    return jnp.where(_applied(k_apply, op.p, images),
                     blur_images(images, gaussian_kernels(sigma, radius)),
                     images.astype(jnp.float32))

  return apply


def _rotate(op: augment.RandomRotate) -> DeviceOp:
  """As `augment.RandomRotate`: a uniform rotation per plane about the centre, each image its
  own draw, with probability ``p``."""

  def one(key, image):
    k_apply, k_rot = jax.random.split(key)
    image = image.astype(jnp.float32)
    matrix = _rotation(k_rot, image.ndim - 1, op.degrees)
    return jnp.where(jax.random.uniform(k_apply) < op.p,
                     warp_about_centre(image, matrix, jnp.zeros(image.ndim - 1)), image)

  return lambda key, images: jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def elastic_images(images: jax.Array, alpha: jax.Array, kernels: jax.Array,
                   noise: jax.Array) -> jax.Array:
  """`augment.RandomElastic`'s maths, per image: the uniform noise ``[B, *spatial, nd]`` (one
  field per spatial axis) smoothed by the image's Gaussian (`gaussian_kernels`, zero outside, as
  scipy's ``mode="constant"``) and scaled by its ``alpha`` ``[B]`` displaces the sampling grid;
  the image is resampled linearly, edges padded with the nearest value."""
  displacement = blur_images(noise, kernels, mode="constant") * _per_image(noise, alpha)
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in images.shape[1:-1]],
                                indexing="ij"), axis=-1)

  def one(image, shift):
    coords = jnp.moveaxis(grid + shift, -1, 0)
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], list(coords), order=1,
                                                        mode="nearest")
                      for c in range(image.shape[-1])], axis=-1)

  return jax.vmap(one)(images.astype(jnp.float32), displacement)


def _elastic(op: augment.RandomElastic) -> DeviceOp:
  """As `augment.RandomElastic`: ``alpha``, ``sigma`` and the noise fields drawn per image, with
  probability ``p``."""
  radius = int(4.0 * op.sigma[1] + 0.5)

  def apply(key, images):
    k_apply, k_alpha, k_sigma, k_noise = jax.random.split(key, 4)
    n = images.shape[0]
    noise = jax.random.uniform(k_noise, images.shape[:-1] + (images.ndim - 2,), minval=-1.0,
                               maxval=1.0)
    kernels = gaussian_kernels(_uniform(k_sigma, n, *op.sigma), radius)
    warped = elastic_images(images, _uniform(k_alpha, n, *op.alpha), kernels, noise)
    return jnp.where(_applied(k_apply, op.p, images), warped, images.astype(jnp.float32))

  return apply


def _normalize(op: transforms.Normalize) -> DeviceOp:
  return lambda key, images: (images - jnp.float32(op.mean)) / jnp.float32(op.std)


def _to_float(op: transforms.ToFloat) -> DeviceOp:
  return lambda key, images: images.astype(jnp.float32) * jnp.float32(op.scale)


# Host transform type -> its device twin. A chain with an op after the first random one that has
# no twin (e.g. a crop, or `transforms.patch`) stays on Grain (`unsupported` names it).
DEVICE_OPS: dict[type, Callable[..., DeviceOp]] = {
    augment.RandomFlip: _flip,
    augment.RandomAffine: _affine,
    augment.RandomIntensity: _intensity,
    augment.RandomGamma: _gamma,
    augment.RandomContrast: _contrast,
    augment.RandomNoise: _noise,
    augment.RandomRot90: _rot90,
    augment.RandomBlur: _blur,
    augment.RandomRotate: _rotate,
    augment.RandomElastic: _elastic,
    transforms.Normalize: _normalize,
    transforms.ToFloat: _to_float,
}


def split_bytes(source, chain: Sequence) -> int:
  """The split's size on the device, from its first record after the host part of ``chain``."""
  record = source[0]
  for op in split_chain(chain)[0]:
    record = op.map(record)
  per = sum(np.asarray(v).nbytes for v in record.values())
  return per * len(source)


def split_chain(chain: Sequence) -> tuple[list, list]:
  """``(host, device)``: the ops before the first random one, and the rest."""
  for i, op in enumerate(chain):
    if isinstance(op, grain.transforms.RandomMap):
      return list(chain[:i]), list(chain[i:])
  return list(chain), []


def unsupported(chain: Sequence) -> list[str]:
  """Names of the ops of ``chain`` that would have to run on the device but have no twin."""
  _, device = split_chain(chain)
  return [type(op).__name__ for op in device if type(op) not in DEVICE_OPS]


def problems(source, chain: Sequence) -> list[str]:
  """Why ``source`` through ``chain`` cannot be fed from the device (empty: it can): ops without
  a twin; a label map on the image grid, which the twins do not move with the image."""
  found = [f"{name} has no on-device version" for name in unsupported(chain)]
  record = source[0]
  label = record.get("label")
  host, device = split_chain(chain)
  if (device and isinstance(label, np.ndarray)
      and label.shape[:-1] == np.shape(record["image"])[:-1]):
    found.append("its labels are maps on the image grid (segmentation), which the on-device "
                 "transforms do not move with the image")
  for op in device:
    if isinstance(op, augment.RandomRot90):
      found.extend(_rot90_problems(op, host, record))
  return found


def _rot90_problems(op: augment.RandomRot90, host: list, record: dict) -> list[str]:
  """A quarter turn on the device must keep the batch's shape (a square plane) and has no
  spacing to swap (the host op swaps the plane's two spacings)."""
  for h in host:
    record = h.map(record)
  nd = np.ndim(record["image"]) - 1
  if not all(-nd <= a < nd for a in op.axes) or op.axes[0] % nd == op.axes[1] % nd:
    return [f"rot90 axes {op.axes} do not name a plane of the {nd}-D image"]
  a, b = (x % nd for x in op.axes)
  shape = np.shape(record["image"])
  found = []
  if shape[a] != shape[b]:
    found.append(f"rot90's plane {op.axes} of its {shape[:-1]} images is not square (a quarter "
                 "turn would change their shape)")
  spacing = record.get("spacing")
  if spacing is not None and np.asarray(spacing)[a] != np.asarray(spacing)[b]:
    found.append(f"rot90 would have to swap its records' unequal spacings {spacing} in plane "
                 f"{op.axes}, which the on-device version does not")
  return found


MODES = ("off", "on", "auto")


def wanted(mode: str, source, chain: Sequence, backend: str, device_bytes: int | None) -> bool:
  """Whether a run with ``data.on_device = mode`` keeps its split on the device.

  ``auto``: on an accelerator (not the CPU, where host and device memory are one and Grain's
  workers already run beside the step), when nothing stands in the way (`problems`) and the
  split takes at most a quarter of the device's memory (unknown memory: no).

  Raises:
    ValueError: an unknown mode, or ``on`` with `problems` (each named).
  """
  if mode not in MODES:
    raise ValueError(f"data.on_device={mode!r}: expected one of {', '.join(MODES)}")
  if mode == "off" or (mode == "auto" and (backend == "cpu" or device_bytes is None)):
    return False
  found = problems(source, chain)
  if mode == "on" and found:
    raise ValueError(f"data.on_device='on' but {'; '.join(found)} (on-device ops: "
                     f"{', '.join(t.__name__ for t in DEVICE_OPS)}); set data.on_device='off' "
                     "to keep the Grain pipeline")
  return not found and (mode == "on" or split_bytes(source, chain) <= device_bytes // 4)


def stream_indices(num_records: int, batch_size: int, seed: int, steps: int) -> np.ndarray:
  """``[steps, batch_size]`` int32: the source index of each record of each step, as Grain's
  ``MapDataset.shuffle(seed).repeat()`` orders them: epoch ``e`` is the permutation
  ``grain.experimental.index_shuffle`` gives for seed ``seed + e`` (4 rounds), as in Grain's
  ``ShuffleMapDataset`` (the test compares the two streams). About 6 µs per record drawn."""
  total = steps * batch_size
  order = np.empty(total, np.int32)
  for start in range(0, total, num_records):
    epoch_seed = (seed + start // num_records) % 2**32
    count = min(num_records, total - start)
    order[start:start + count] = [
        grain.experimental.index_shuffle(i, max_index=num_records - 1, seed=epoch_seed, rounds=4)
        for i in range(count)]
  return order.reshape(steps, batch_size)


@dataclasses.dataclass
class DeviceData:
  """A split in device memory and the run's batch order.

  Attributes:
    arrays: the records' fields stacked (``image`` after the host part of the chain), replicated
      on every device of the mesh.
    indices: ``[steps, batch]`` source indices (`stream_indices`), on the device.
    ops: the device part of the chain.
    seed: base of the random ops' keys.
  """

  arrays: dict[str, jax.Array]
  indices: jax.Array
  ops: list[DeviceOp]
  seed: int

  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.arrays.values()) + self.indices.nbytes

  def batch(self, arrays: dict[str, jax.Array], indices: jax.Array,
            step: jax.Array) -> dict[str, jax.Array]:
    """The batch of train step ``step + 1`` (``step``: the state's count of steps done), traced
    inside the train step: a gather, then the device ops."""
    rows = indices[step]
    batch = {k: jnp.take(v, rows, axis=0) for k, v in arrays.items()}
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    images = batch["image"]
    for k, op in enumerate(self.ops):
      images = op(jax.random.fold_in(key, k), images)
    return {**batch, "image": images}


def build(source, chain: Sequence, *, batch_size: int, seed: int, steps: int,
          sharding: jax.sharding.Sharding) -> DeviceData:
  """Reads every record of ``source`` once through the host part of ``chain`` and uploads them.

  Raises:
    ValueError: as `wanted` for ``on``, or the records differ in shape.
  """
  wanted("on", source, chain, "", None)
  host, device = split_chain(chain)
  records = []
  for i in range(len(source)):
    record = source[i]
    for op in host:
      record = op.map(record)
    records.append(record)
  arrays = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
  indices = stream_indices(len(source), batch_size, seed, steps)
  # From a callback, so every process of a multi-process run places its own copy.
  put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  return DeviceData({k: put(v) for k, v in arrays.items()}, put(indices),
                    [DEVICE_OPS[type(op)](op) for op in device], seed)
