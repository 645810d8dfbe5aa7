"""Atomic writes: the target holds the old file or the whole new one, and no temporary is left."""

import json
import os

import pytest

from medjax.io.atomic import atomic_open, atomic_path, atomic_write, atomic_write_json


def test_writes_replace_the_target_and_leave_nothing_else(tmp_path):
  path = tmp_path / "a.json"
  atomic_write(path, "old")
  atomic_write_json(path, {"k": 1})
  assert json.loads(path.read_text()) == {"k": 1}
  atomic_write(path, b"bytes")
  assert path.read_bytes() == b"bytes"
  assert os.listdir(tmp_path) == ["a.json"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("old")
  with pytest.raises(RuntimeError):
    with atomic_open(path) as f:
      f.write("half")
      raise RuntimeError("interrupted")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_path_keeps_the_suffix_writers_choose_a_format_by(tmp_path):
  with atomic_path(tmp_path / "x.nii.gz", suffix=".nii.gz") as tmp:
    assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path)
    open(tmp, "w").close()
  assert os.listdir(tmp_path) == ["x.nii.gz"]
