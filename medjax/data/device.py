"""Training data kept in accelerator memory: the whole split uploaded once, each step's batch
gathered and augmented inside the jitted train step, so the host does nothing per step.

For splits that fit (MedMNIST, 2-D slices). The batches hold the records the Grain pipeline
(`medjax.data.pipeline.train_dataset`) would give for the same seed, in the same order: the
index of every record of every step comes from Grain's own shuffle, computed once for the run.
The deterministic transforms before the first random one run once on the host when the split is
uploaded; the rest run on the device, where each op has a JAX twin here (`DEVICE_OPS`). A random
op on the device draws from ``jax.random`` (keyed by seed, step and op), not from the generator
Grain passes to its host twin: the same distribution, not the same draws. The position in the
stream is the train state's step, so a checkpoint of the state is a checkpoint of the data too.
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


def _rotation(key: jax.Array, nd: int, degrees: float) -> jax.Array:
  """As `medjax.data.spatial._random_rotation`: one uniform rotation per plane, multiplied."""
  matrix = jnp.eye(nd)
  planes = list(itertools.combinations(range(nd), 2))
  thetas = jnp.deg2rad(jax.random.uniform(key, (len(planes),), minval=-degrees, maxval=degrees))
  for (a, b), theta in zip(planes, thetas):
    r = jnp.eye(nd).at[a, a].set(jnp.cos(theta)).at[b, b].set(jnp.cos(theta))
    matrix = matrix @ r.at[a, b].set(-jnp.sin(theta)).at[b, a].set(jnp.sin(theta))
  return matrix


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


def _normalize(op: transforms.Normalize) -> DeviceOp:
  return lambda key, images: (images - jnp.float32(op.mean)) / jnp.float32(op.std)


def _to_float(op: transforms.ToFloat) -> DeviceOp:
  return lambda key, images: images.astype(jnp.float32) * jnp.float32(op.scale)


# Host transform type -> its device twin. A chain with a random op that has no twin stays on
# Grain (`unsupported` names it).
DEVICE_OPS: dict[type, Callable[..., DeviceOp]] = {
    augment.RandomFlip: _flip,
    augment.RandomAffine: _affine,
    augment.RandomIntensity: _intensity,
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
  if (split_chain(chain)[1] and isinstance(label, np.ndarray)
      and label.shape[:-1] == np.shape(record["image"])[:-1]):
    found.append("its labels are maps on the image grid (segmentation), which the on-device "
                 "transforms do not move with the image")
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
