"""Region declarations and the label maps made from region probabilities (nnU-Net's regions)."""

import jax.numpy as jnp
import numpy as np
import pytest

from medjax import planning
from medjax.planning import regions as regions_lib

NAMES = ["background", "oedema", "non_enhancing", "enhancing"]
BRATS = ("whole_tumour=1,2,3", "core=2,3", "enhancing=3")


def test_nested_regions_parse_with_the_label_each_adds():
  parsed = regions_lib.parse_regions(BRATS, NAMES)
  assert parsed == [{"name": "whole_tumour", "labels": [1, 2, 3], "label": 1},
                    {"name": "core", "labels": [2, 3], "label": 2},
                    {"name": "enhancing", "labels": [3], "label": 3}]
  assert regions_lib.parse_regions((), NAMES) is None
  # Disjoint groups are regions too: each adds its own label.
  assert [r["label"] for r in regions_lib.parse_regions(("a=1", "b=2"), NAMES)] == [1, 2]


@pytest.mark.parametrize("spec, match", [
    (("whole",), "expected 'name=label,label,...'"),
    (("whole=a,b",), "expected 'name=label,label,...'"),
    (("whole=1,4",), r"label\(s\) \[4\] are not foreground labels"),
    (("whole=0,1",), r"label\(s\) \[0\] are not foreground labels"),
    (("a=1,2", "a=3"), "repeat an earlier one"),
    (("a=1,2", "b=1,2"), "repeat an earlier one"),
    (("inner=3", "whole=1,2,3"), "no label values"),  # inner first: a label map cannot show it
    (("whole=1,2,3",), "several label values"),
])
def test_a_bad_declaration_is_one_line_naming_the_setting(spec, match):
  with pytest.raises(ValueError, match=match) as e:
    regions_lib.parse_regions(spec, NAMES)
  assert "data.regions" in str(e.value) and "\n" not in str(e.value)


def test_later_regions_overwrite_earlier_ones_in_numpy_and_jax():
  probs = np.array([[0.9, 0.2, 0.1],    # whole only → 1
                    [0.9, 0.8, 0.1],    # whole and core → 2
                    [0.9, 0.8, 0.7],    # all three → 3
                    [0.1, 0.1, 0.9],    # enhancing alone: nnU-Net's order still writes 3
                    [0.4, 0.4, 0.4]],   # none → background
                   np.float32)
  expected = [1, 2, 3, 3, 0]
  np.testing.assert_array_equal(regions_lib.labels_from_regions(probs, [1, 2, 3]), expected)
  np.testing.assert_array_equal(
      np.asarray(regions_lib.labels_from_regions(jnp.asarray(probs), [1, 2, 3])), expected)
  plan = {"num_classes": 4, "class_names": NAMES,
          "regions": regions_lib.parse_regions(BRATS, NAMES)}
  assert planning.label_map(probs, plan).shape == (5, 1)
  np.testing.assert_array_equal(planning.label_map(probs, plan)[:, 0], expected)
  # The same probabilities under a plan without regions: the argmax over label values.
  plain = {"num_classes": 3, "class_names": NAMES[:3], "regions": None}
  np.testing.assert_array_equal(planning.label_map(probs, plain)[:, 0], [0, 0, 0, 2, 0])


def test_what_a_region_plan_predicts_and_scores():
  plan = {"num_classes": 4, "class_names": NAMES,
          "regions": regions_lib.parse_regions(BRATS, NAMES)}
  assert planning.output_channels(plan) == 3
  assert planning.output_names(plan) == ("whole_tumour", "core", "enhancing")
  assert planning.scored_classes(plan) == [(1, 2, 3), (2, 3), (3,)]
  assert planning.scored_names(plan) == {(1, 2, 3): "whole_tumour", (2, 3): "core",
                                           (3,): "enhancing"}
  old = {"num_classes": 3, "class_names": ["background", "a", "b"]}  # written before regions
  assert planning.output_channels(old) == 3 and planning.scored_classes(old) == [1, 2]
  assert planning.scored_names(old) == {1: "a", 2: "b"}
  labels = jnp.asarray([0, 1, 2, 3])
  np.testing.assert_array_equal(
      np.asarray(regions_lib.region_targets(labels, [(1, 2, 3), (2, 3), (3,)])),
      [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_make_plan_records_the_regions():
  fp = {"spacings": [[1.0, 1.0, 1.0]], "median_spacing": [1.0, 1.0, 1.0],
        "median_shape": [20, 20, 20], "channels": ["FLAIR"], "foreground_intensity": [{}],
        "class_names": NAMES}
  plan = planning.make_plan(fp, regions=BRATS)
  assert plan["num_classes"] == 4 and [r["name"] for r in plan["regions"]] == [
      "whole_tumour", "core", "enhancing"]
  assert planning.make_plan(fp)["regions"] is None
  with pytest.raises(ValueError, match="data.regions"):
    planning.make_plan(fp, regions=("whole=1,2,5",))


def test_sigmoid_is_in_place_and_matches_jax():
  x = np.linspace(-30, 30, 13, dtype=np.float32)
  expected = np.asarray(1 / (1 + np.exp(-x.astype(np.float64))), np.float32)
  out = regions_lib.sigmoid_(x)
  assert out is x
  np.testing.assert_allclose(out, expected, rtol=1e-6)
