"""Input pipelines from Grain: a checkpointable, per-process-sharded train stream and eval batches.

The train stream is ``source → shuffle(seed) → repeat → transforms → batch → [process slice]``.
Shuffling and random transforms happen on *global* indices before the per-process slice, so a
global batch holds the same records in the same order whatever the number of processes: process
``p`` of ``P`` holds the ``p``-th of its ``P`` consecutive blocks. That makes multi-process
training match a single-process run of the same global batch, mixup's pairs included.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import grain
import numpy as np
from absl import flags

Transform = grain.transforms.Map | grain.transforms.RandomMap


def _apply(ds: grain.MapDataset, transforms: Sequence[Transform], seed: int) -> grain.MapDataset:
  for k, t in enumerate(transforms):
    if isinstance(t, grain.transforms.RandomMap):
      # A distinct, fixed seed per op keeps ops independent and the stream reproducible.
      ds = ds.random_map(t, seed=seed + 1 + k)
    else:
      ds = ds.map(t)
  return ds


def train_dataset(source, transforms: Sequence[Transform], *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  num_threads: int = 4, prefetch: int = 8, workers: int = 0,
                  device_sharding=None, device_prefetch: int = 2) -> grain.IterDataset:
  """An endless stream of this process's share of each global batch.

  Args:
    source: a random-access source of dict records.
    transforms: Grain transforms applied per record.
    global_batch_size: records per step across all processes (divisible by ``process_count``).
    seed: shuffle seed (a new permutation each epoch) and base seed of random transforms.
    process_index, process_count: this process's place (``jax.process_index()/count()``).
    num_threads, prefetch: Grain read threads and prefetch buffer (records).
    workers: Grain worker processes (``mp_prefetch``) that prepare batches beside the training
      process; 0: none. Threads share one interpreter lock, so only processes scale the
      per-record Python work to a GPU's appetite. Batches and their order are the same either
      way, and so is the checkpointable state.
    device_sharding: where given (one process on an accelerator), batches are moved there
      ``device_prefetch`` steps ahead of the step that reads them (``grain.experimental.
      device_put``), so the transfer overlaps the step; the state stays that of the batch read.

  Returns:
    A ``grain.IterDataset``; ``iter()`` of it is checkpointable (``get_state``/``set_state``).
    Each element is a dict of numpy arrays with leading dim ``global_batch_size // process_count``
    (with ``device_sharding``: global ``jax.Array``s placed by it).
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} "
                     "processes")
  if len(source) < global_batch_size:
    raise ValueError(f"{source!r} has {len(source)} records, fewer than one batch "
                     f"({global_batch_size})")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = _apply(ds, transforms, seed)
  # Consecutive blocks, one per process: global batch k is records [kG, (k+1)G) of the stream in
  # order, however many processes share it (so what mixes with what in a batch does not depend
  # on the topology either).
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  if workers:
    if not flags.FLAGS.is_parsed():  # a notebook or test: Grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  if device_sharding is not None:
    if process_count > 1:  # each process holds only its share: to_global assembles batches
      raise ValueError("device prefetch places whole batches: one process only")
    ds = grain.experimental.device_put(ds, device_sharding, cpu_buffer_size=prefetch,
                                       device_buffer_size=device_prefetch)
  return ds


def resolve_workers(workers: int, backend: str, cores: int | None = None) -> int:
  """``workers`` as configured, or for -1 (auto): none on a CPU backend, whose cores all run
  the model, else half of this process's cores up to 8."""
  if workers >= 0:
    return workers
  if workers != -1:
    raise ValueError(f"data.workers must be >= 0, or -1 for auto, got {workers}")
  if cores is None:  # the cores this process may run on (taskset, container limits)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return 0 if backend == "cpu" else min(8, max(1, (cores or 2) // 2))


def capped_batch_size(batch_size: int, num_records: int, multiple: int = 1) -> int:
  """``batch_size``, but no larger than ``num_records`` rounded up to a multiple of ``multiple``
  (the devices that share a batch): a split smaller than the configured eval batch is then
  evaluated in one batch padded by fewer than ``multiple`` records, not by the rest of the
  configured size (100,000 of which would fill the host's memory)."""
  return max(multiple, min(batch_size, -(-num_records // multiple) * multiple))


def eval_batches(source, transforms: Sequence[Transform], *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of every record once, in fixed-size batches padded with a mask.

  Every process yields the same number of batches (so collective ops line up); padding records
  repeat record 0 and carry ``mask = 0``.

  Yields:
    Dicts of numpy arrays with leading dim ``global_batch_size // process_count`` and a float32
    ``"mask"`` (1 for real records).
  """
  if global_batch_size % process_count:
    raise ValueError(f"eval batch {global_batch_size} is not divisible by {process_count} "
                     "processes")
  n = len(source)
  local = global_batch_size // process_count
  num_batches = -(-n // global_batch_size)
  ds = _apply(grain.MapDataset.source(source), transforms, seed=0)
  for b in range(num_batches):
    idx = [b * global_batch_size + process_index + process_count * i for i in range(local)]
    records = [ds[i if i < n else 0] for i in idx]
    batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
    batch["mask"] = np.array([1.0 if i < n else 0.0 for i in idx], np.float32)
    yield batch
