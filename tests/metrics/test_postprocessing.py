"""Keep-largest-component post-processing: the component filter and nnU-Net's decision rule."""

import json

import numpy as np
import pytest

from medjax.io.errors import MedjaxIOError
from medjax.metrics import postprocessing as pp


def _case(shift: int) -> np.ndarray:
  """A reference: class 1 touching class 2's first blob, and a second class-2 blob apart."""
  ref = np.zeros((24, 24, 24), np.uint8)
  ref[4 + shift:10 + shift, 4:10, 4:10] = 1
  ref[10 + shift:14 + shift, 4:10, 4:10] = 2
  ref[18:21, 16:20, 16:20] = 2  # a true second component of class 2
  return ref


def test_keeps_the_largest_component_with_full_connectivity():
  labels = np.zeros((10, 10, 10), np.uint8)
  labels[1:4, 1:4, 1:4] = 1
  labels[4, 4, 4] = 1  # touches the block only by a corner: the same component (26-neighbours)
  labels[8, 8, 8] = 1  # apart: removed
  labels[8, 1, 1] = 2  # another class: untouched
  out = pp.keep_largest_component(labels, [1])
  assert out[4, 4, 4] == 1 and out[8, 8, 8] == 0 and out[8, 1, 1] == 2
  assert np.count_nonzero(out == 1) == 28
  assert labels[8, 8, 8] == 1  # the input is not modified
  tie = np.zeros((9, 9), np.uint8)
  tie[1:3, 1:3] = tie[6:8, 6:8] = 1
  np.testing.assert_array_equal(pp.keep_largest_component(tie, [1]), tie)  # equal sizes: both
  channel = labels[..., None]  # [*spatial, 1] as Volume arrays
  np.testing.assert_array_equal(pp.keep_largest_component(channel, [1])[..., 0], out)


def test_the_decision_removes_a_planted_component_only_where_it_raises_dice():
  refs = [_case(s) for s in range(4)]
  preds = []
  for n, ref in enumerate(refs):
    pred = ref.copy()
    pred[20 - n:22 - n, 2:4, 20:22] = 1  # a small false class-1 component, apart from the rest
    preds.append(pred)
  decision = pp.determine_postprocessing(preds, refs, [1, 2])
  # All foreground as one would also drop class 2's true second blob; per class, only class 1
  # gains (class 2's keep-largest would remove its true second blob).
  assert decision["keep_largest"] == [[1]]
  assert [s["applied"] for s in decision["steps"]] == [False, True, False]
  assert decision["dice_after"]["1"] > decision["dice_before"]["1"]
  assert decision["dice_after"]["2"] == decision["dice_before"]["2"]

  new = _case(1)
  new[20:22, 2:4, 20:22] = 1  # planted in both classes; only class 1's goes
  new[2:4, 20:22, 2:4] = 2
  out = pp.apply_postprocessing(new, decision)
  assert np.all(out[20:22, 2:4, 20:22] == 0)
  assert np.all(out[2:4, 20:22, 2:4] == 2)
  changed = np.argwhere(out != new)  # nothing else: the true structures stay as they were
  assert len(changed) == 8 and np.all((changed >= [20, 2, 20]) & (changed < [22, 4, 22]))
  np.testing.assert_array_equal(pp.apply_postprocessing(new, None), new)


def test_all_foreground_is_kept_when_it_helps_every_class_and_a_tie_changes_nothing():
  refs = [np.pad(np.ones((6, 6, 6), np.uint8), 5) for _ in range(3)]
  for r in refs:
    r[5:8] = 2
  preds = [r.copy() for r in refs]
  for p in preds:
    p[0, 0, 0] = 1
    p[15, 15, 15] = 2
  decision = pp.determine_postprocessing(preds, refs, [1, 2])
  assert decision["keep_largest"] == [[1, 2]]
  assert decision["foreground_dice_after"] == pytest.approx(1.0)
  same = pp.determine_postprocessing(refs, refs, [1, 2])  # nothing to remove: Dice ties
  assert same["keep_largest"] == [] and not any(s["applied"] for s in same["steps"])


def test_decision_files_round_trip_and_bad_ones_are_named(tmp_path):
  path = str(tmp_path / pp.FILENAME)
  pp.write_decision(path, {"keep_largest": [[1]], "steps": []})
  assert pp.read_decision(path)["keep_largest"] == [[1]]
  assert pp.find_decision(str(tmp_path)) == path
  for bad in ({"keep_largest": [[0]]}, {"keep_largest": "1"}, [1]):
    with open(path, "w") as f:
      json.dump(bad, f)
    with pytest.raises(MedjaxIOError, match="keep_largest"):
      pp.read_decision(path)
  with pytest.raises(MedjaxIOError, match="missing"):
    pp.read_decision(str(tmp_path / "none.json"))
