"""nnU-Net planning: MSD folders, plan, cache, folds and the patch sampler, on synthetic cases."""

import copy as copy_module
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
from conftest import write_msd

from medjax import planning as seg
from medjax.io import msd
from medjax.io.errors import MedjaxIOError


@pytest.mark.parametrize("layout,channels", [("msd", ("MRI",)), ("msd", ("T1", "T2")),
                                             ("nnunet", ("T1", "T2"))])
def test_read_both_layouts(tmp_path, layout, channels):
  root = write_msd(tmp_path, n=3, channels=channels, layout=layout)
  dataset = msd.read_msd_dataset(root)
  assert dataset.labels == ("background", "outer", "core") and len(dataset.cases) == 3
  image, label = msd.load_msd_case(dataset, dataset.cases[0])
  assert image.channels == len(channels) and label.channels == 1
  assert image.orientation == "RAS" and image.shape == label.shape


def _rewrite_label(root, case, array, affine=None):
  path = os.path.join(root, "labelsTr", f"{case}.nii.gz")
  old = nib.load(path)
  nib.save(nib.Nifti1Image(array, old.affine if affine is None else affine), path)
  return path


def test_bad_cases_name_the_file(tmp_path):
  root = write_msd(tmp_path, n=2)
  dataset = msd.read_msd_dataset(root)
  case = dataset.cases[0]
  shape = nib.load(case.label).shape
  path = _rewrite_label(root, case.case_id, np.zeros(shape[:2] + (shape[2] + 1,), np.uint8))
  with pytest.raises(MedjaxIOError, match="label map not on its image's grid: shape") as e:
    msd.load_msd_case(dataset, case)
  assert e.value.path == path
  shifted = nib.load(case.images[0]).affine.copy()
  shifted[0, 3] += 2.0
  _rewrite_label(root, case.case_id, np.zeros(shape, np.uint8), shifted)
  with pytest.raises(MedjaxIOError, match="affine differs"):
    msd.load_msd_case(dataset, case)
  _rewrite_label(root, case.case_id, np.full(shape, 5, np.uint8))
  with pytest.raises(MedjaxIOError, match=r"labels \[5\] outside the 3 declared classes"):
    msd.load_msd_case(dataset, case)
  four_d = np.zeros(shape + (2,), np.float32)  # two channels where dataset.json declares one
  nib.save(nib.Nifti1Image(four_d, shifted), case.images[0])
  with pytest.raises(MedjaxIOError, match="2 channel\\(s\\), dataset.json declares 1"):
    msd.load_msd_case(dataset, case)
  os.remove(dataset.cases[1].label)
  with pytest.raises(MedjaxIOError, match="label file listed in dataset.json is missing"):
    msd.read_msd_dataset(root)


def test_empty_label_map_is_accepted_without_locations(tmp_path):
  root = write_msd(tmp_path, n=2)
  dataset = msd.read_msd_dataset(root)
  case = dataset.cases[0]
  _rewrite_label(root, case.case_id, np.zeros(nib.load(case.label).shape, np.uint8))
  plan = seg.make_plan(seg.fingerprint(dataset))
  folder = seg.prepare_cache(dataset, plan, str(tmp_path / "cache"))
  cached = seg.load_cached(folder, case.case_id)
  assert len(cached.locations) == 0 and cached.label.max() == 0
  patch = seg.RandomPatch(shape=(16, 16, 16), foreground=1.0)
  out = patch.random_map(seg.CaseSource(folder, [case.case_id])[0], np.random.default_rng(0))
  assert out["label"].shape == (16, 16, 16, 1)  # no foreground to centre on: placed uniformly


def test_plan_rules_and_overrides(tmp_path):
  dataset = msd.read_msd_dataset(write_msd(tmp_path, n=4))
  fp = seg.fingerprint(dataset)
  plan = seg.make_plan(fp, max_patch_voxels=16 * 16 * 16)
  total = np.prod(plan["strides"], axis=0)
  assert np.all(np.array(plan["patch_size"]) % total == 0)
  assert np.prod(plan["patch_size"]) <= 2 * 16**3  # the budget, up to the rounding
  assert len(plan["features"]) == len(plan["strides"])
  assert np.all(np.array(plan["patch_size"]) / total >= 4)
  assert seg.make_plan(fp, overrides={"patch_size": [8, 8, 8]})["patch_size"] == [8, 8, 8]
  with pytest.raises(KeyError, match="not a plan key"):
    seg.make_plan(fp, overrides={"patch": 1})
  flat = seg.make_plan(fp, dims=2)
  assert flat["slice_axis"] == 0 and len(flat["patch_size"]) == 2


def test_anisotropic_plan_uses_the_coarse_axis(tmp_path):
  dataset = msd.read_msd_dataset(write_msd(tmp_path, n=3, spacing=(0.7, 0.7, 5.0)))
  plan = seg.make_plan(seg.fingerprint(dataset), dims=2)
  assert plan["slice_axis"] == 2
  plan3 = seg.make_plan(seg.fingerprint(dataset))
  assert plan3["strides"][-1][2] == 1  # the thin axis (few voxels) stops pooling first


def test_cache_round_trip_and_reuse(tmp_path):
  dataset = msd.read_msd_dataset(write_msd(tmp_path, n=3))
  plan = seg.make_plan(seg.fingerprint(dataset))
  folder = seg.prepare_cache(dataset, plan, str(tmp_path / "cache"))
  stamp = {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)}
  assert seg.prepare_cache(dataset, plan, str(tmp_path / "cache")) == folder
  assert stamp == {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)}
  for case in dataset.cases:
    cached = seg.load_cached(folder, case.case_id)
    image, label = msd.load_msd_case(dataset, case)
    assert cached.image.dtype == np.float32 and abs(float(np.mean(cached.image))) < 0.5
    one_hot = np.eye(3, dtype=np.float32)[cached.label[..., 0]]
    restored = seg.restore_geometry(one_hot, cached.props)
    np.testing.assert_array_equal(np.argmax(restored, -1), label.array[..., 0])


def test_sources_pickle_as_paths_and_map_the_cache_again(tmp_path):
  dataset = msd.read_msd_dataset(write_msd(tmp_path, n=3))
  folder = seg.prepare_cache(dataset, seg.make_plan(seg.fingerprint(dataset)),
                             str(tmp_path / "cache"))
  ids = [c.case_id for c in dataset.cases]
  for source in (seg.CaseSource(folder, ids), seg.SliceSource(folder, ids, axis=2)):
    # Only the pickled size is checked; the round trip goes through the same __getstate__ /
    # __setstate__ by deepcopy, so nothing here loads pickled bytes.
    assert len(pickle.dumps(source)) < 2_000  # paths only: workers map the files themselves
    copy = copy_module.deepcopy(source)
    assert len(copy) == len(source) and isinstance(copy.cases[0].image, np.memmap)
    for i in (0, len(source) - 1):
      for key, value in source[i].items():
        np.testing.assert_array_equal(copy[i][key], value)


def test_cache_with_resampling_restores_the_original_grid(tmp_path):
  dataset = msd.read_msd_dataset(write_msd(tmp_path, n=2, spacing=(1.0, 1.0, 1.5)))
  plan = seg.make_plan(seg.fingerprint(dataset), overrides={"target_spacing": [1.5, 1.5, 1.0]})
  folder = seg.prepare_cache(dataset, plan, str(tmp_path / "cache"))
  case = dataset.cases[0]
  cached = seg.load_cached(folder, case.case_id)
  _, label = msd.load_msd_case(dataset, case)
  assert cached.props["preprocessed_shape"] != cached.props["cropped_shape"]
  restored = np.argmax(seg.restore_geometry(np.eye(3, dtype=np.float32)[cached.label[..., 0]],
                                            cached.props), -1)
  assert restored.shape == label.shape
  for k in (1, 2):
    a, b = restored == k, label.array[..., 0] == k
    assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.85


def test_folds_are_written_once_and_reused(tmp_path):
  ids = [f"c{i:02d}" for i in range(11)]
  path = str(tmp_path / "splits.json")
  splits = seg.make_folds(ids, path)
  assert len(splits) == 5
  assert sorted(i for s in splits for i in s["val"]) == sorted(ids)
  for s in splits:
    assert not set(s["train"]) & set(s["val"])
  assert seg.make_folds(list(reversed(ids)), path, seed=99) == splits  # reused, not redrawn
  with pytest.raises(MedjaxIOError, match="does not cover"):
    seg.make_folds(ids + ["extra"], path)


def test_patch_sampler_oversamples_foreground_and_pads():
  rng = np.random.default_rng(0)
  label = np.zeros((30, 30, 30, 1), np.uint8)
  label[3:5, 3:5, 3:5] = 1  # a tiny structure a uniform patch rarely covers
  record = {"image": rng.normal(size=(30, 30, 30, 1)).astype(np.float32), "label": label,
            "locations": np.argwhere(label[..., 0] == 1)}
  record["locations"] = np.concatenate([np.ones((8, 1), int), record["locations"]], 1)
  op = seg.RandomPatch(shape=(8, 8, 8), foreground=0.33)
  hits = [op.random_map(record, np.random.default_rng(s))["label"].any() for s in range(1000)]
  assert 0.28 < np.mean(hits) < 0.40  # 1/3 forced + a few uniform hits
  again = op.random_map(record, np.random.default_rng(7))
  np.testing.assert_array_equal(again["image"], op.random_map(record, np.random.default_rng(7))[
      "image"])
  big = seg.RandomPatch(shape=(36, 8, 8), foreground=0.0).random_map(record,
                                                                      np.random.default_rng(1))
  assert big["image"].shape == (36, 8, 8, 1) and "locations" not in big
  assert np.all(big["image"][:3] == 0) and np.all(big["image"][-3:] == 0)  # padded both sides
  flat = seg.RandomPatch(shape=(1, 8, 8), squeeze=0).random_map(record, np.random.default_rng(2))
  assert flat["image"].shape == (8, 8, 1) and flat["label"].shape == (8, 8, 1)


def _write_case_folders(root, ids, shape=(6, 7, 5)):
  """BraTS-like case folders: ``case_<i>/{FLAIR,T1,GT_W}.nii.gz`` (float labels, as shipped)."""
  rng = np.random.default_rng(0)
  for i in ids:
    folder = os.path.join(root, f"case_{i}")
    os.makedirs(folder)
    for name in ("FLAIR", "T1"):
      nib.save(nib.Nifti1Image(rng.uniform(1, 9, shape).astype(np.float32), np.eye(4)),
               os.path.join(folder, f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image((rng.uniform(size=shape) > 0.7).astype(np.float32), np.eye(4)),
             os.path.join(folder, "GT_W.nii.gz"))
  return root


def test_case_folders_read_as_an_msd_dataset(tmp_path):
  root = _write_case_folders(str(tmp_path / "brats"), [10, 2, 0])
  dataset = msd.read_msd_dataset(root)
  assert dataset.channels == ("FLAIR", "T1") and dataset.labels == ("background", "tumour")
  assert [c.case_id for c in dataset.cases] == ["case_0", "case_2", "case_10"]  # natural order
  image, label = msd.load_msd_case(dataset, dataset.cases[1])
  assert image.channels == 2 and label.channels == 1 and set(np.unique(label.array)) <= {0, 1}
  os.remove(os.path.join(root, "case_10", "T1.nii.gz"))
  with pytest.raises(MedjaxIOError, match="missing") as e:
    msd.read_msd_dataset(root)
  assert e.value.path.endswith(os.path.join("case_10", "T1.nii.gz"))
  os.makedirs(tmp_path / "other" / "case_0")
  with pytest.raises(MedjaxIOError, match="no dataset.json"):
    msd.read_msd_dataset(tmp_path / "other")
