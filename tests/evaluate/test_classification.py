"""Classification report: scikit-learn parity, hand-checked rates and ECE, temperature scaling,
bootstrap coverage and determinism, and the tables and plots (segmentation's bootstrap too)."""

import csv

import numpy as np
import pytest
from scipy import special, stats
from sklearn import metrics as skm

from medjax.evaluate import classification as cls
from medjax.evaluate import metrics
from medjax.evaluate import segmentation as seg

# Binormal scores: negatives ~ N(0, 1), positives ~ N(SEPARATION, 1), called positive above the
# midpoint, so both classes are right with the same probability and the population ACC does not
# depend on the class mix.
SEPARATION = 1.5
POPULATION_ACC = stats.norm.cdf(SEPARATION / 2)
POPULATION_AUC = stats.norm.cdf(SEPARATION / np.sqrt(2))


def _binormal(rng, n, prevalence=0.4):
  labels = (rng.random(n) < prevalence).astype(np.int64)
  scores = rng.normal(size=n) + SEPARATION * labels
  p1 = special.expit(2.0 * (scores - SEPARATION / 2))  # p1 >= 0.5 exactly above the midpoint
  return labels, np.stack([1 - p1, p1], 1)


def _random_multiclass(rng, n=300, k=4):
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k))
  logits[np.arange(n), labels] += 1.0
  return labels, special.softmax(logits, 1)


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


# --- Point metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_equal_sklearn(seed):
  labels, probs = _binormal(np.random.default_rng(seed), 200)
  pred = (probs[:, 1] >= 0.5).astype(int)
  assert cls.roc_auc(labels, probs) == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))
  tied = np.round(probs, 1)  # many ties: they count half, as in scikit-learn's trapezoids
  assert cls.roc_auc(labels, tied) == pytest.approx(skm.roc_auc_score(labels, tied[:, 1]))
  np.testing.assert_array_equal(cls.confusion_matrix(labels, probs, 0.5),
                                skm.confusion_matrix(labels, pred))
  assert cls.f1(labels, probs, 0.5) == pytest.approx(skm.f1_score(labels, pred))
  assert cls.balanced_accuracy(labels, probs, 0.5) == pytest.approx(
      skm.balanced_accuracy_score(labels, pred))
  assert cls.accuracy(labels, probs, 0.5) == pytest.approx(skm.accuracy_score(labels, pred))


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_equal_sklearn(seed):
  labels, probs = _random_multiclass(np.random.default_rng(seed))
  pred = probs.argmax(1)
  assert cls.roc_auc(labels, probs) == pytest.approx(
      skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
  np.testing.assert_array_equal(cls.confusion_matrix(labels, probs),
                                skm.confusion_matrix(labels, pred))
  assert cls.f1(labels, probs) == pytest.approx(skm.f1_score(labels, pred, average="macro"))
  assert cls.balanced_accuracy(labels, probs) == pytest.approx(
      skm.balanced_accuracy_score(labels, pred))
  # Multi-class ignores the threshold: always the argmax.
  assert cls.accuracy(labels, probs, 0.9) == cls.accuracy(labels, probs)


def test_one_vs_rest_rates_from_sklearn_binary_confusions():
  labels, probs = _random_multiclass(np.random.default_rng(3))
  rates = cls.one_vs_rest_rates(labels, probs)
  for c in range(probs.shape[1]):
    tn, fp, fn, tp = skm.confusion_matrix(labels == c, probs.argmax(1) == c).ravel()
    assert rates["sensitivity"][c] == pytest.approx(tp / (tp + fn))
    assert rates["specificity"][c] == pytest.approx(tn / (tn + fp))


def test_loop_selector_agrees_with_the_report():
  for labels, probs in (_binormal(np.random.default_rng(4), 150),
                        _random_multiclass(np.random.default_rng(5))):
    selector = metrics.classification_metrics(labels, probs.astype(np.float32))
    report = cls.classification_report(labels, probs, n_boot=0)["metrics"]
    for name in ("acc", "auc", "nll"):
      assert selector[name] == pytest.approx(report[name]["value"], rel=1e-6)


def test_auc_is_nan_without_every_class():
  probs = np.full((4, 3), 1 / 3)
  assert np.isnan(cls.roc_auc(np.array([0, 1, 1, 0]), probs))
  assert np.isnan(cls.roc_auc(np.zeros(4, int), np.full((4, 2), 0.5)))
  assert np.isnan(metrics.classification_metrics(np.zeros(4, int), np.full((4, 2), 0.5))["auc"])


# 4 positives, 6 negatives. At 0.5: TP 3 (0.9, 0.8, 0.6), FN 1 (0.3), FP 1 (0.7), TN 5.
_LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
_P1 = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.1, 0.05])
_PROBS = np.stack([1 - _P1, _P1], 1)


def test_binary_rates_by_hand():
  assert cls.binary_rates(_LABELS, _PROBS, 0.5) == pytest.approx(
      {"sensitivity": 3 / 4, "specificity": 5 / 6, "ppv": 3 / 4, "npv": 5 / 6})
  # At 0.35 the 0.4 negative turns positive: FP 2, TN 4; a score equal to the threshold is positive.
  assert cls.binary_rates(_LABELS, _PROBS, 0.35) == pytest.approx(
      {"sensitivity": 3 / 4, "specificity": 4 / 6, "ppv": 3 / 5, "npv": 4 / 5})
  assert cls.binary_rates(_LABELS, _PROBS, 0.3)["sensitivity"] == 1.0
  # Nothing called positive: PPV is undefined, not 0.
  rates = cls.binary_rates(_LABELS, _PROBS, 0.95)
  assert np.isnan(rates["ppv"]) and rates["sensitivity"] == 0 and rates["npv"] == 6 / 10


def test_youden_threshold_by_hand():
  # Negatives 0.1 0.2 0.3 0.35 0.6, positives 0.4 0.5 0.7 0.8 0.9. J at each threshold:
  # 0.9: .2, 0.8: .4, 0.7: .6, 0.6: .4, 0.5: .6, 0.4: .8 (all positives, one false), 0.35: .6.
  labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
  p1 = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.4, 0.5, 0.7, 0.8, 0.9])
  probs = np.stack([1 - p1, p1], 1)
  assert cls.youden_threshold(labels, probs) == pytest.approx(0.4)
  report = cls.classification_report(labels, probs, n_boot=0)["metrics"]
  assert report["youden_threshold"]["value"] == pytest.approx(0.4)
  assert report["sensitivity@youden"]["value"] == 1.0
  assert report["specificity@youden"]["value"] == pytest.approx(0.8)
  # A tie goes to the higher threshold: negatives 0.1 0.2 0.3 0.5, positives 0.4 0.7 0.8 0.9
  # have J = 0.75 at both 0.7 (no false positive) and 0.4 (no false negative).
  p1 = np.array([0.1, 0.2, 0.3, 0.5, 0.4, 0.7, 0.8, 0.9])
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  assert cls.youden_threshold(labels, np.stack([1 - p1, p1], 1)) == pytest.approx(0.7)


# --- Calibration


def test_ece_and_reliability_by_hand():
  # 5 bins. Confidence 0.9 right and wrong -> bin (0.8, 1]: acc .5, gap .4; 0.7 twice right ->
  # (0.6, 0.8]: gap .3; 0.55 wrong -> (0.4, 0.6]: gap .55. ECE = (2*.4 + 2*.3 + .55) / 5 = 0.39.
  probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.7, 0.3], [0.3, 0.7], [0.45, 0.55]])
  labels = np.array([1, 0, 0, 1, 0])
  assert cls.expected_calibration_error(labels, probs, num_bins=5) == pytest.approx(0.39)
  bins = cls.reliability_diagram(labels, probs, num_bins=5)
  np.testing.assert_array_equal(bins["count"], [0, 0, 1, 2, 2])
  np.testing.assert_allclose(bins["confidence"][2:], [0.55, 0.7, 0.9])
  np.testing.assert_allclose(bins["accuracy"][2:], [0.0, 1.0, 0.5])
  assert np.isnan(bins["accuracy"][:2]).all()
  # Bins are (lo, hi]: a confidence on an edge belongs to the bin below it.
  edge = cls.reliability_diagram(np.array([2, 0]), np.array([[0.1, 0.1, 0.8], [0.6, 0.2, 0.2]]),
                                 num_bins=5)
  np.testing.assert_array_equal(edge["count"], [0, 0, 1, 1, 0])


def test_perfectly_calibrated_predictions_have_small_ece():
  rng = np.random.default_rng(6)
  probs = rng.dirichlet(np.ones(3), 20000)
  labels = np.array([rng.choice(3, p=p) for p in probs])
  assert cls.expected_calibration_error(labels, probs) < 0.02


def test_temperature_scaling_recovers_a_known_temperature():
  rng = np.random.default_rng(7)
  true_logits = rng.normal(scale=2.0, size=(5000, 5))
  labels = (special.softmax(true_logits, 1).cumsum(1) < rng.random((5000, 1))).sum(1)
  overconfident = 2.0 * true_logits  # a model twice as sure as it should be: T = 2 undoes it
  t = cls.fit_temperature(labels, overconfident)
  assert t == pytest.approx(2.0, rel=0.1)
  # Log-probabilities give the same temperature; scaling keeps the argmax and lowers the NLL.
  assert cls.fit_temperature(labels, special.log_softmax(overconfident, 1)) == pytest.approx(t)
  calibrated = cls.apply_temperature(overconfident, t)
  np.testing.assert_array_equal(calibrated.argmax(1), overconfident.argmax(1))
  assert cls.nll(labels, calibrated) < cls.nll(labels, special.softmax(overconfident, 1))
  assert (cls.expected_calibration_error(labels, calibrated)
          < cls.expected_calibration_error(labels, special.softmax(overconfident, 1)))


# --- Bootstrap


def test_stratified_resamples_keep_class_counts():
  labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
  for idx in cls.resample_indices(len(labels), 20, seed=0, strata=labels):
    np.testing.assert_array_equal(np.bincount(labels[idx]), [7, 3, 5])


def test_bootstrap_is_deterministic_for_a_seed():
  labels, probs = _binormal(np.random.default_rng(8), 120)
  a = cls.bootstrap_ci(cls.roc_auc, labels, probs, n_boot=50, seed=3)
  assert a == cls.bootstrap_ci(cls.roc_auc, labels, probs, n_boot=50, seed=3)
  assert a != cls.bootstrap_ci(cls.roc_auc, labels, probs, n_boot=50, seed=4)
  assert a["lo"] <= a["value"] <= a["hi"] and a["n_boot"] == 50
  r1 = cls.classification_report(labels, probs, n_boot=20, seed=1)
  assert r1["metrics"] == cls.classification_report(labels, probs, n_boot=20, seed=1)["metrics"]


def test_bootstrap_skips_undefined_resamples_and_counts_the_rest():
  labels = np.array([1] + [0] * 19)  # one positive: unstratified resamples often miss it
  probs = np.stack([np.linspace(0.9, 0.1, 20), np.linspace(0.1, 0.9, 20)], 1)
  out = cls.bootstrap_ci(cls.roc_auc, labels, probs, n_boot=100, seed=0, stratify=False)
  with_positive = sum(labels[idx].max() == 1 for idx in cls.resample_indices(20, 100, seed=0))
  assert 0 < out["n_boot"] == with_positive < 100
  # Stratified, every resample keeps the positive, so none is skipped.
  assert cls.bootstrap_ci(cls.roc_auc, labels, probs, n_boot=100)["n_boot"] == 100


def _coverage(metric_fn, truth, repetitions, n_cases, n_boot, seed):
  rng = np.random.default_rng(seed)
  hits = 0
  for r in range(repetitions):
    labels, probs = _binormal(rng, n_cases)
    ci = cls.bootstrap_ci(metric_fn, labels, probs, n_boot=n_boot, seed=r)
    hits += ci["lo"] <= truth <= ci["hi"]
  return hits / repetitions


def test_bootstrap_ci_covers_the_population_accuracy():
  assert 0.88 <= _coverage(lambda y, p: cls.accuracy(y, p, 0.5), POPULATION_ACC,
                           repetitions=200, n_cases=100, n_boot=200, seed=9) <= 0.99


def test_bootstrap_ci_covers_the_population_auc():
  assert 0.88 <= _coverage(cls.roc_auc, POPULATION_AUC, repetitions=200, n_cases=100,
                           n_boot=200, seed=10) <= 0.99


# --- Report, tables, CSV


def test_binary_report_points_and_intervals():
  labels, probs = _binormal(np.random.default_rng(11), 200)
  report = cls.classification_report(labels, probs, threshold=0.5, n_boot=100, seed=0,
                                     class_names=["normal", "pneumonia"])
  m = report["metrics"]
  assert list(m) == ["auc", "acc", "balanced_acc", "f1", "sensitivity", "specificity", "ppv",
                     "npv", "youden_threshold", "sensitivity@youden", "specificity@youden",
                     "ppv@youden", "npv@youden", "ece", "nll"]
  assert m["auc"]["value"] == pytest.approx(cls.roc_auc(labels, probs))
  assert m["sensitivity"]["value"] == pytest.approx(
      cls.binary_rates(labels, probs, 0.5)["sensitivity"])
  assert m["ece"]["value"] == pytest.approx(cls.expected_calibration_error(labels, probs))
  for interval in m.values():
    assert interval["lo"] <= interval["hi"] and interval["n_boot"] == 100
  assert report["confusion_matrix"] == cls.confusion_matrix(labels, probs, 0.5).tolist()
  assert report["class_counts"] == np.bincount(labels).tolist()
  assert sum(report["reliability"]["count"]) == len(labels)


def test_multiclass_report_has_per_class_rates():
  labels, probs = _random_multiclass(np.random.default_rng(12), n=200, k=3)
  report = cls.classification_report(labels, probs, n_boot=10, class_names=["a", "b", "c"])
  assert report["threshold"] is None
  assert {"sensitivity[a]", "specificity[c]", "auc", "f1"} <= set(report["metrics"])
  assert "youden_threshold" not in report["metrics"]
  with pytest.raises(ValueError, match="class names"):
    cls.classification_report(labels, probs, n_boot=0, class_names=["a", "b"])


def test_format_table_and_csv(tmp_path):
  labels, probs = _random_multiclass(np.random.default_rng(13), n=120, k=3)
  report = cls.classification_report(labels, probs, n_boot=30, class_names=["x", "y|z", "w"])
  table = cls.format_table(report)
  lines = table.splitlines()
  assert lines[0] == "| Metric | Value [95% CI] |"
  auc = report["metrics"]["auc"]
  assert f"| AUC | {auc['value']:.3f} [{auc['lo']:.3f}, {auc['hi']:.3f}] |" in lines
  assert any(line.startswith("| Sensitivity (y\\|z) |") for line in lines)
  assert len(lines) == 2 + len(report["metrics"])
  point_only = cls.format_table(cls.classification_report(labels, probs, n_boot=0))
  assert f"| AUC | {auc['value']:.3f} |" in point_only.splitlines()

  cls.write_csv(report, tmp_path / "results.csv")
  with open(tmp_path / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["metric"] for r in rows] == list(report["metrics"])
  assert float(rows[0]["lo"]) == pytest.approx(report["metrics"][rows[0]["metric"]]["lo"])
  assert int(rows[0]["n_boot"]) == 30


# --- Plots


def test_plots_write_pngs(tmp_path):
  labels, probs = _binormal(np.random.default_rng(14), 150)
  cls.plot_roc(labels, probs, tmp_path / "roc.png", "binary", n_boot=50)
  cls.plot_pr(labels, probs, tmp_path / "pr.png", "binary")
  cls.plot_reliability(labels, probs, tmp_path / "reliability.png", "binary")
  cls.plot_confusion(labels, probs, tmp_path / "cm.png", "binary", class_names=["no", "yes"])
  labels3, probs3 = _random_multiclass(np.random.default_rng(15), n=150, k=3)
  cls.plot_roc(labels3, probs3, tmp_path / "roc3.png", n_boot=20, class_names=["a", "b", "c"])
  cls.plot_confusion(labels3, probs3, tmp_path / "cm3.png")
  multi_label = (np.random.default_rng(16).random((150, 3)) < 0.4).astype(int)
  cls.plot_roc(multi_label, probs3, tmp_path / "roc_ml.png", n_boot=10)  # as write_report does
  for name in ("roc", "pr", "reliability", "cm", "roc3", "cm3", "roc_ml"):
    assert _is_png(tmp_path / f"{name}.png"), name


# --- Segmentation: the same bootstrap over cases, and the Dice box plot


def _segmentation_cases(n=30, seed=17):
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n):
    case = {c: {"dice": float(np.clip(rng.normal(0.9 - 0.1 * c, 0.05), 0, 1)), "iou": 0.5,
                "hd95": 1.0, "msd": 0.5} for c in (1, 2)}
    cases.append(case)
  cases[0][2]["dice"] = float("nan")  # both masks empty: left out, as summarize does
  return cases


def test_segmentation_bootstrap_means(tmp_path):
  cases = _segmentation_cases()
  summary = seg.summarize(cases)
  out = seg.bootstrap_means(cases, n_boot=200, seed=0)
  for c in (1, 2):
    assert out["per_class"][c]["value"] == pytest.approx(summary.mean[c]["dice"])
    assert out["per_class"][c]["lo"] < summary.mean[c]["dice"] < out["per_class"][c]["hi"]
    assert out["per_class"][c]["n_boot"] == 200
  assert out["foreground"]["value"] == pytest.approx(summary.foreground_dice)
  assert out == seg.bootstrap_means(cases, n_boot=200, seed=0)
  seg.plot_dice_boxes(cases, tmp_path / "dice.png", class_names=["liver", "tumour"])
  assert _is_png(tmp_path / "dice.png")
