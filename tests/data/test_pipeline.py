import numpy as np
import pytest

from medjax.data import pipeline, transforms
from medjax.data.sources import ArraySource


def _source(n=40):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  return ArraySource(images, (np.arange(n) % 3).astype(np.int64))


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_each_epoch_is_a_new_permutation_of_all_records():
  src = _source(40)
  it = iter(pipeline.train_dataset(src, [], global_batch_size=8, seed=0))
  epoch1 = np.concatenate([b["index"] for b in _take(it, 5)])
  epoch2 = np.concatenate([b["index"] for b in _take(it, 5)])
  assert sorted(epoch1) == list(range(40)) and sorted(epoch2) == list(range(40))
  assert not np.array_equal(epoch1, epoch2)


def test_processes_split_each_global_batch_exactly():
  src = _source(40)
  tf = transforms.parse("to_float|flip(axes=(0, 1))")
  single = _take(iter(pipeline.train_dataset(src, tf, global_batch_size=8, seed=1)), 7)
  parts = [_take(iter(pipeline.train_dataset(src, tf, global_batch_size=8, seed=1,
                                             process_index=p, process_count=2)), 7)
           for p in range(2)]
  for b, (p0, p1) in enumerate(zip(*parts)):
    assert p0["image"].shape[0] == 4
    # The processes' blocks in process order are the single-process batch, in its order (what a
    # batch-order-dependent step such as mixup pairs must not depend on the topology)...
    np.testing.assert_array_equal(np.concatenate([p0["index"], p1["index"]]), single[b]["index"])
    # ...with the same augmentation, record by record.
    np.testing.assert_array_equal(np.concatenate([p0["image"], p1["image"]]), single[b]["image"])


def test_iterator_state_restores_the_exact_position():
  src = _source(40)
  tf = transforms.parse("to_float|affine")
  ds = pipeline.train_dataset(src, tf, global_batch_size=8, seed=2)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  it2 = iter(ds)
  it2.set_state(state)
  for a, b in zip(expected, _take(it2, 4)):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], b["image"])


def test_device_prefetch_gives_the_same_batches_placed_and_the_read_batchs_state():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  src, tf = _source(40), transforms.parse("to_float|flip(axes=(0, 1))")
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:2]), ("data",)), PartitionSpec("data"))
  host = _take(iter(pipeline.train_dataset(src, tf, global_batch_size=8, seed=4)), 9)
  ds = pipeline.train_dataset(src, tf, global_batch_size=8, seed=4, device_sharding=sharding,
                              device_prefetch=3)
  it = iter(ds)
  placed = _take(it, 4)
  state = it.get_state()  # four read, more prefetched: the state is the fifth batch's
  placed += _take(it, 5)
  for a, b in zip(host, placed):
    assert b["image"].sharding == sharding
    np.testing.assert_array_equal(a["image"], np.asarray(b["image"]))
  it2 = iter(ds)
  it2.set_state(state)
  for a, b in zip(host[4:], _take(it2, 5)):
    np.testing.assert_array_equal(a["index"], np.asarray(b["index"]))
  it.close()
  it2.close()
  with pytest.raises(ValueError, match="one process only"):
    pipeline.train_dataset(src, tf, global_batch_size=8, seed=4, process_count=2,
                           device_sharding=sharding)


def test_worker_processes_give_the_same_batches_and_resumable_state():
  src = _source(40)
  tf = transforms.parse("to_float|flip(axes=(0, 1))|intensity")
  threads = _take(iter(pipeline.train_dataset(src, tf, global_batch_size=8, seed=3)), 9)
  ds = pipeline.train_dataset(src, tf, global_batch_size=8, seed=3, workers=2)
  it = iter(ds)
  try:
    first = _take(it, 4)
    state = it.get_state()
  finally:
    it.close()
  resumed = iter(ds)
  resumed.set_state(state)
  try:
    rest = _take(resumed, 5)
  finally:
    resumed.close()
  for a, b in zip(threads, first + rest):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("workers,backend,cores,expected",
                         [(3, "gpu", 16, 3), (0, "gpu", 16, 0), (-1, "cpu", 16, 0),
                          (-1, "gpu", 16, 8), (-1, "gpu", 6, 3), (-1, "tpu", 1, 1)])
def test_resolve_workers(workers, backend, cores, expected):
  assert pipeline.resolve_workers(workers, backend, cores) == expected


def test_resolve_workers_rejects_other_negatives():
  with pytest.raises(ValueError, match="data.workers"):
    pipeline.resolve_workers(-2, "gpu", 16)


def test_eval_batches_cover_every_record_once_with_a_mask():
  src = _source(37)
  for pc in (1, 2):
    seen = []
    counts = []
    for p in range(pc):
      batches = list(pipeline.eval_batches(src, [], global_batch_size=8, process_index=p,
                                           process_count=pc))
      counts.append(len(batches))
      for b in batches:
        seen += list(b["index"][b["mask"] > 0])
    assert len(set(counts)) == 1
    assert sorted(seen) == list(range(37))


def test_batch_sizes_are_checked():
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_dataset(_source(), [], global_batch_size=9, seed=0, process_count=2)
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.train_dataset(_source(4), [], global_batch_size=8, seed=0)
