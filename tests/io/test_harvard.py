"""The Harvard atlas fusion reader and its whole-case test split."""

import os

import numpy as np
import pytest
from conftest import write_fusion_atlas
from PIL import Image

from medjax.io import harvard
from medjax.io.errors import MedjaxIOError


def test_pairs_are_read_with_their_case_slice_and_colour(tmp_path):
  root = write_fusion_atlas(str(tmp_path))
  pairs = harvard.read_pairs(root, "PET-MRI")
  assert [p.id for p in pairs] == ["PET-MRI/25_001", "PET-MRI/25_002", "PET-MRI/30_001"]
  p = pairs[0]
  assert (p.case, p.slice, p.name, p.modalities) == (25, 1, "25001.png", ("MRI", "PET"))
  assert p.a.shape == (32, 32) and p.b.shape == (32, 32, 3) and p.a.dtype == np.uint8
  ct = harvard.read_pairs(root, "CT-MRI")[0]
  assert ct.modalities == ("MRI", "CT") and ct.b.ndim == 2


def test_a_grey_image_stored_as_rgb_reads_as_grey(tmp_path):
  grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
  Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "g.png")
  np.testing.assert_array_equal(harvard.read_image(tmp_path / "g.png"), grey)


def test_whole_cases_are_held_out_on_the_same_side_in_every_folder():
  cases = {"CT-MRI": [2, 20, 28, 32, 33, 34, 37, 41], "PET-MRI": [25, 30, 41],
           "SPECT-MRI": [3, 4, 10, 11, 15, 18, 21, 22, 25, 28, 29, 35, 40]}
  split = harvard.held_out_cases(cases)
  assert split == harvard.held_out_cases({p: c[::-1] for p, c in cases.items()})  # order-free
  test = {c for cs in split.values() for c in cs}
  for pair, cs in cases.items():
    assert len(split[pair]) == max(1, round(0.25 * len(cs)))
    train = set(cs) - set(split[pair])
    assert train and not train & test  # a case is test everywhere or nowhere


def test_the_atlas_split_is_the_documented_one(data_root):
  root = os.path.join(data_root, "fusion", "harvard_aanlib")
  if not os.path.isdir(root):
    pytest.skip(f"{root} is missing")
  assert harvard.split_of(root) == {"CT-MRI": [28, 32], "PET-MRI": [30],
                                    "SPECT-MRI": [21, 28, 35]}
  assert [len(harvard.list_pairs(root, p)) for p in harvard.PAIRS] == [149, 269, 293]
  test = harvard.read_pairs(root, "CT-MRI", "test")
  assert len(test) == 34 and {p.case for p in test} == {28, 32}
  assert {p.b.ndim for p in harvard.read_pairs(root, "PET-MRI", "test")[:3]} == {3}


def test_validation_cases_are_whole_training_cases_the_same_in_every_folder(tmp_path, data_root):
  root = os.path.join(data_root, "fusion", "harvard_aanlib")
  if not os.path.isdir(root):
    pytest.skip(f"{root} is missing")
  val, test = harvard.validation_cases(root), harvard.split_of(root)
  assert val == {"CT-MRI": [20], "PET-MRI": [25], "SPECT-MRI": [4, 25]}
  cases = {p: {c for c, _, _ in harvard.list_pairs(root, p)} for p in harvard.PAIRS}
  held = {c for p in harvard.PAIRS for c in val[p]}
  for p in harvard.PAIRS:
    assert not set(val[p]) & set(test[p]) and cases[p] - set(val[p]) - set(test[p])
    assert cases[p] & held == set(val[p])  # a validation case is one in every folder
  small = write_fusion_atlas(str(tmp_path), cases={"CT-MRI": {2: 1, 3: 1}})
  with pytest.raises(MedjaxIOError, match="1 training case.*none left to train on"):
    harvard.validation_cases(small)


def test_one_folder_read_alone_keeps_the_split_of_all(tmp_path):
  root = write_fusion_atlas(str(tmp_path))
  both = harvard.split_of(root)
  assert harvard.split_of(root, ["SPECT-MRI"]) == {"SPECT-MRI": both["SPECT-MRI"]}
  test = {p.case for p in harvard.read_pairs(root, "SPECT-MRI", "test")}
  train = {p.case for p in harvard.read_pairs(root, "SPECT-MRI", "train")}
  assert test == set(both["SPECT-MRI"]) and not test & train and test | train == {3, 28, 40}


def test_problems_are_io_errors_naming_the_file(tmp_path):
  root = write_fusion_atlas(str(tmp_path), cases={"CT-MRI": {2: 2}})
  with pytest.raises(MedjaxIOError, match="missing folder"):
    harvard.read_pairs(root, "PET-MRI")
  os.remove(os.path.join(root, "CT-MRI", "CT", "2002.png"))
  with pytest.raises(MedjaxIOError, match="one modality folder only, e.g. 2002.png"):
    harvard.read_pairs(root, "CT-MRI")
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(os.path.join(root, "CT-MRI", "CT", "2002.png"))
  with pytest.raises(MedjaxIOError, match="2002.png.*pixels"):
    harvard.read_pairs(root, "CT-MRI")
  with open(os.path.join(root, "CT-MRI", "CT", "2002.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.raises(MedjaxIOError, match="2002.png: unreadable image"):
    harvard.read_pairs(root, "CT-MRI")
  Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep.png")
  with pytest.raises(MedjaxIOError, match="8-bit"):
    harvard.read_image(tmp_path / "deep.png")
  with pytest.raises(ValueError, match="unknown pair"):
    harvard.read_pairs(root, "MRI-MRI")
