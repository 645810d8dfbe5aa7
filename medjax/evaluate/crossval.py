r"""Cross-validation of a segmentation config: every training case predicted by the fold that did
not train on it, scored together, and nnU-Net's post-processing decided on those predictions.

  python -m medjax.evaluate --cv runs/hippo_cv [--n_boot 1000] [--holdout]

The folder holds one run per fold (`medjax.infer.ensemble.fold_runs`), e.g. made by
``launch.py --config configs/hippocampus_unet3d.py:cv --workdir runs/hippo_cv --sweep``. Each
fold's sliding-window validation (`medjax.infer.segment.validate`, which launch.py runs after
training) wrote its out-of-fold predictions in the input files' geometry; a fold not validated yet
is validated here first. Written:

- ``<folder>/crossval/``: ``predictions/`` (the out-of-fold label maps, one per case),
  ``postprocessed/`` (the same after the decision), ``results.md`` (per-class Dice, IoU, HD95,
  MSD tables before and after post-processing, Dice and HD95 with 95% bootstrap intervals over
  cases), ``results.csv`` (one row per case × class × post-processing), ``summary.json``,
  ``dice_boxes.png``.
- ``<folder>/postprocessing.json``: the keep-largest-component decision
  (`medjax.metrics.postprocessing`), which ``predict`` applies when given this folder.

``--holdout`` then predicts the config's ``data.holdout`` cases (kept out of every fold) with fold
0 alone and with the fold ensemble, each with and without the post-processing, into
``crossval/holdout/`` (`evaluate_holdout`).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import time
from typing import Any, Sequence

import ml_collections
import nibabel as nib
import numpy as np
import tqdm

from medjax import planning
from medjax.infer import segment
from medjax.infer.ensemble import Ensemble, check_same_preprocessing, fold_runs
from medjax.infer.trained import read_run_config
from medjax.io import msd
from medjax.io.atomic import atomic_write_json
from medjax.io.errors import MedjaxIOError
from medjax.io.nifti import read_nifti_labels, write_nifti
from medjax.metrics import bootstrap
from medjax.metrics import postprocessing as pp
from medjax.metrics import segmentation as seg_metrics
from medjax.planning.preprocessing import preprocess, restore_geometry
from medjax.train import builders
from medjax.train import runs as runs_lib

_DIGITS = {"dice": 3, "hd95": 2}


def dataset_of(run: str) -> msd.MSDDataset:
  config = ml_collections.ConfigDict(read_run_config(run))
  return msd.read_msd_dataset(builders.msd_root(config.data))


def _check_validated(runs: Sequence[str], mirror: bool | None) -> None:
  """Validates each fold whose training finished but whose validation has not run."""
  for run in runs:
    if runs_lib.read_summary(run, runs_lib.VALIDATION) is not None:
      continue
    if runs_lib.read_summary(run) is None:
      raise MedjaxIOError(run, "this fold has not finished training; the cross-validation "
                          "needs every fold")
    config = read_run_config(run)
    segment.validate(run, mirror=config["eval"].get("mirror", True) if mirror is None
                     else mirror)


def read_splits(runs: Sequence[str]) -> list[dict[str, list[str]]]:
  """The folds' common ``splits.json``; a `MedjaxIOError` where one fold's differs."""
  splits = None
  for run in runs:
    path = os.path.join(run, "splits.json")
    with open(path) as f:
      mine = json.load(f)
    if splits is None:
      splits = mine
    elif mine != splits:
      raise MedjaxIOError(path, f"differs from {runs[0]}'s: the folds were not split alike")
  return splits


def score_cases(cases: list[dict[str, Any]], classes: Sequence[seg_metrics.Class], n_boot: int,
                names: dict[seg_metrics.Class, str]) -> dict[str, Any]:
  """Summary, table and Dice/HD95 bootstrap intervals of per-case metrics."""
  per_case = [c["metrics"] for c in cases]
  summary = seg_metrics.summarize(per_case)
  out = {"table": seg_metrics.format_table(summary, names),
         "foreground_dice": summary.foreground_dice,
         "per_class": {names[c]: {m: summary.mean[c][m] for m in seg_metrics.METRICS}
                       for c in classes}}
  for metric in _DIGITS:
    ci = seg_metrics.bootstrap_means(per_case, metric, n_boot=n_boot, seed=0)
    out[f"{metric}_ci95"] = {**{names[c]: ci["per_class"][c] for c in classes},
                             "foreground": ci["foreground"]}
  return out


def _ci_line(label: str, metric: str, intervals: dict[str, dict[str, float]]) -> str:
  d = _DIGITS[metric]
  return f"{label}: " + ", ".join(f"{name} {iv['value']:.{d}f} [{iv['lo']:.{d}f}, {iv['hi']:.{d}f}]"
                                  for name, iv in intervals.items())


def evaluate_cv(folder: str, n_boot: int = bootstrap.N_BOOT,
                mirror: bool | None = None) -> dict[str, Any]:
  """Scores the out-of-fold predictions of a cross-validation folder and decides the
  post-processing on them (module docstring).

  Args:
    folder: the cross-validation folder (one run per fold).
    n_boot: bootstrap resamples for the intervals.
    mirror: for folds validated here: mirroring (default: each run's ``eval.mirror``).

  Returns:
    The summary written to ``crossval/summary.json`` (without per-case rows).
  """
  folder = os.path.abspath(folder)
  runs = fold_runs(folder)
  plan = check_same_preprocessing(runs)
  _check_validated(runs, mirror)
  splits = read_splits(runs)
  dataset = dataset_of(runs[0])
  classes, names = planning.scored_classes(plan), planning.scored_names(plan)
  out = os.path.join(folder, "crossval")
  for sub in ("predictions", "postprocessed"):
    shutil.rmtree(os.path.join(out, sub), ignore_errors=True)  # a rerun writes them afresh
    os.makedirs(os.path.join(out, sub))
  t0 = time.perf_counter()
  preds, refs, cases = [], [], []
  for fold, run in enumerate(runs):
    for case_id in splits[fold]["val"]:
      written = os.path.join(run, "validation", f"{case_id}.nii.gz")
      if not os.path.isfile(written):
        raise MedjaxIOError(written, f"missing: fold {fold}'s validation did not write this "
                            "case; delete its validation/summary.json and rerun")
      pred = read_nifti_labels(written)  # canonical, as the reference
      _, label = msd.load_msd_case(dataset, dataset.case(case_id))
      if pred.shape != label.shape:
        raise MedjaxIOError(written, f"shape {pred.shape} differs from the reference's "
                            f"{label.shape}")
      shutil.copyfile(written, os.path.join(out, "predictions", f"{case_id}.nii.gz"))
      preds.append(pred)
      refs.append(label)
      cases.append({"case": case_id, "fold": fold})
  ignore = plan.get("ignore_label")
  decision = pp.determine_postprocessing([p.array for p in preds], [r.array for r in refs],
                                         classes, ignore)
  decision["class_names"] = {seg_metrics.class_key(c): n for c, n in names.items()}
  decision["folds"] = [os.path.relpath(r, folder) for r in runs]
  pp.write_decision(os.path.join(folder, pp.FILENAME), decision)

  raw_cases, post_cases = [], []
  for case, pred, label in zip(tqdm.tqdm(cases, desc="score", unit="case"), preds, refs):
    post = pred.replace(array=pp.apply_postprocessing(pred.array, decision))
    source = dataset.case(case["case"]).images[0]
    write_nifti(post.reoriented(nib.load(source).affine),
                os.path.join(out, "postprocessed", f"{case['case']}.nii.gz"), dtype=np.uint8)
    for rows, labels in ((raw_cases, pred), (post_cases, post)):
      rows.append({**case, "metrics": seg_metrics.segmentation_metrics(
          labels.array, label.array, label.spacing, classes, ignore)})
  raw = score_cases(raw_cases, classes, n_boot, names)
  post = score_cases(post_cases, classes, n_boot, names)
  seg_metrics.plot_dice_boxes([c["metrics"] for c in raw_cases],
                              os.path.join(out, "dice_boxes.png"), names,
                              title=f"out of fold, {len(cases)} cases")
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["case", "fold", "postprocessed", "class", *seg_metrics.METRICS])
    for flag, rows in ((0, raw_cases), (1, post_cases)):
      for r in rows:
        for c in classes:
          w.writerow([r["case"], r["fold"], flag, names[c],
                      *(r["metrics"][c][m] for m in seg_metrics.METRICS)])
  label_names = plan["class_names"]  # by label value
  kept = ", ".join("+".join(label_names[v] for v in g) for g in decision["keep_largest"]) or "nothing"
  steps = "; ".join(f"{'+'.join(label_names[v] for v in s['labels'])}: Dice {s['dice_before']:.5f} → "
                    f"{s['dice_after']:.5f} ({'kept' if s['applied'] else 'not kept'})"
                    for s in decision["steps"])
  lines = [f"# Cross-validation: {len(runs)} folds, {len(cases)} cases out of fold", "",
           f"Folds: {', '.join(decision['folds'])}. Each case predicted by the fold that did not "
           "train on it (sliding window, as each fold's validation). Intervals: 95% bootstrap "
           f"over cases, {n_boot} resamples.", "", "## Out-of-fold predictions", "",
           raw["table"], _ci_line("Dice", "dice", raw["dice_ci95"]), "",
           _ci_line("HD95 (mm)", "hd95", raw["hd95_ci95"]), "",
           "![Dice per case](dice_boxes.png)", "",
           "## Post-processing (keep the largest connected component)", "",
           f"Decided on these predictions as nnU-Net v2 does: {steps}. Kept: {kept} "
           "(`postprocessing.json`, which predict applies).", "",
           post["table"], _ci_line("Dice", "dice", post["dice_ci95"]), "",
           _ci_line("HD95 (mm)", "hd95", post["hd95_ci95"]), ""]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines))
  result = {"folds": decision["folds"], "cases": len(cases), "n_boot": n_boot,
            "seconds": time.perf_counter() - t0,
            "raw": {k: v for k, v in raw.items() if k != "table"},
            "postprocessed": {k: v for k, v in post.items() if k != "table"},
            "postprocessing": decision["keep_largest"]}
  atomic_write_json(os.path.join(out, "summary.json"), result, indent=1, default=float)
  return result


def _fg(rows: list[dict], idx: np.ndarray | range) -> float:
  return seg_metrics.summarize([rows[i]["metrics"] for i in idx]).foreground_dice


def paired_difference(a: Sequence[list[dict]], b: list[dict], n_boot: int) -> dict[str, Any]:
  """Bootstrap interval of the mean foreground Dice of ``b`` minus that of ``a``'s variants
  (their mean, where several), paired over cases."""
  def statistic(idx: np.ndarray) -> dict[str, float]:
    return {"diff": _fg(b, idx) - float(np.mean([_fg(rows, idx) for rows in a]))}

  return bootstrap.bootstrap(statistic, len(b), n_boot=n_boot, seed=0)["diff"]


def fold_agreement(labels: Sequence[np.ndarray], classes: Sequence[seg_metrics.Class]) -> float:
  """Mean Dice between every pair of label maps (per class, then over the classes and pairs;
  a class that neither map of a pair has counts in no mean; NaN if none counts): how alike an
  ensemble's members predict a case."""
  values = [seg_metrics.dice(np.isin(a, seg_metrics.class_labels(c)),
                             np.isin(b, seg_metrics.class_labels(c)))
            for a, b in itertools.combinations(labels, 2) for c in classes]
  kept = [v for v in values if not np.isnan(v)]
  return float(np.mean(kept)) if kept else float("nan")


def ensemble_sizes(scored: dict[tuple[int, ...], list[dict]]) -> dict[str, Any]:
  """How the ensemble's Dice grows with its members: the mean foreground Dice of ensembles of k
  members, averaged over every choice of k (``scored``: each subset of member indices → its
  per-case rows, as `score_cases` takes them), and the Dice of an unlimited ensemble of the same
  recipe that ``a - b / k`` fitted to them projects (None with fewer than three sizes).

  Why ``1 / k``: an average of k members' probabilities strays from their expectation with a
  variance that falls as ``1 / k``, and for small strays the expected Dice falls linearly in that
  variance; what the ensemble cannot remove (the members' shared error) is ``a``'s gap to 1.
  """
  by_size: dict[int, list[float]] = {}
  for subset, rows in scored.items():
    by_size.setdefault(len(subset), []).append(_fg(rows, range(len(rows))))
  curve = {k: float(np.mean(v)) for k, v in sorted(by_size.items())}
  projected = None
  if len(curve) >= 3:
    slope, intercept = np.polyfit([1 / k for k in curve], list(curve.values()), 1)
    projected = {"dice": float(intercept), "b": float(-slope)}
  return {"curve": curve, "projected": projected}


def holdout_cases(folder: str, runs: Sequence[Sequence[str]]) -> list[str]:
  """The first folder's ``data.holdout`` (``runs``: each cross-validation folder's fold runs,
  ``folder`` the first's path, for messages).

  Raises:
    MedjaxIOError: the list is empty, or another folder's lacks some of its cases (its folds may
      have trained on them: scoring them would leak), naming that folder's ``config.json``.
  """
  holdout = list(read_run_config(runs[0][0])["data"].get("holdout") or ())
  if not holdout:
    raise MedjaxIOError(os.path.join(runs[0][0], "config.json"),
                        "data.holdout is empty: no held-out cases to evaluate")
  for other_runs in runs[1:]:
    seen = set(holdout) - set(read_run_config(other_runs[0])["data"].get("holdout") or ())
    if seen:
      raise MedjaxIOError(os.path.join(other_runs[0], "config.json"), (
          f"data.holdout lacks {len(seen)} of {folder}'s held-out cases (e.g. {min(seen)}): its "
          "folds may have trained on them"))
  return holdout


def write_variant_rows(path: str, rows: dict[str, list[dict]], classes: Sequence[seg_metrics.Class],
                       names: dict[seg_metrics.Class, str]) -> None:
  """A hold-out's ``results.csv``: one row per case × variant × class (``rows``: variant → its
  per-case rows, as `score_cases` takes them)."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["case", "variant", "class", *seg_metrics.METRICS])
    for v, variant_rows in rows.items():
      for r in variant_rows:
        for c in classes:
          w.writerow([r["case"], v, names[c], *(r["metrics"][c][m] for m in seg_metrics.METRICS)])


# The hold-out's rows: fold 0, the fold ensemble, and with ``also`` every fold of both folders.
HOLDOUT_VARIANTS = ("fold0", "fold0+pp", "ensemble", "ensemble+pp", "combined", "combined+pp")


def evaluate_holdout(folder: str, n_boot: int = bootstrap.N_BOOT, mirror: bool = True,
                     also: Sequence[str] = ()) -> dict[str, Any]:
  """Fold 0 alone vs the fold ensemble, each with and without post-processing (and every fold
  alone, unprocessed, against the ensemble), on the config's
  hold-out cases (``data.holdout``); writes ``crossval/holdout/`` (``results.md``,
  ``results.csv``, ``summary.json``). Needs `evaluate_cv`'s ``postprocessing.json``.

  ``also``: other cross-validation folders (e.g. the 2-D folds beside these 3-D ones, nnU-Net's
  ``2d`` + ``3d_fullres``) whose folds join this folder's in one more variant, ``combined``; their
  preprocessing must equal this folder's, and the post-processing is this folder's decision.

  Returns:
    ``{variant: {"foreground_dice", "per_class", "dice_ci95"}, "ensemble_minus_fold0": {raw,
    postprocessed intervals}, "single_folds" (each fold's mean Dice alone, unprocessed),
    "ensemble_minus_mean_fold" (interval), "fold_agreement" (`fold_agreement`, averaged over
    cases), "ensemble_sizes" (`ensemble_sizes` of this folder's folds), "combined_minus_fold0"
    (with ``also``), "cases", "seconds"}``.
  """
  folder = os.path.abspath(folder)
  runs = fold_runs(folder)
  n_own = len(runs)
  others = [fold_runs(other) for other in also]
  holdout = holdout_cases(folder, [runs] + others)
  runs += [run for other_runs in others for run in other_runs]
  decision = pp.read_decision(os.path.join(folder, pp.FILENAME))
  dataset = dataset_of(runs[0])
  ensemble = Ensemble(runs)
  plan = ensemble.plan
  classes, names = planning.scored_classes(plan), planning.scored_names(plan)
  regions = planning.plan_regions(plan) is not None
  variants = HOLDOUT_VARIANTS if also else HOLDOUT_VARIANTS[:4]
  rows: dict[str, list[dict]] = {v: [] for v in variants}
  single: list[list[dict]] = [rows["fold0"]] + [[] for _ in range(n_own - 1)]
  agreement: list[float] = []  # per case: how alike the folds' label maps are
  # Ensembles of 2 … n-1 of the folds (all 1 and n are scored anyway): `ensemble_sizes`.
  subsets = {s: [] for k in range(2, n_own) for s in itertools.combinations(range(n_own), k)}
  t0 = time.perf_counter()
  for case_id in tqdm.tqdm(holdout, desc="hold-out", unit="case"):
    image, label = msd.load_msd_case(dataset, dataset.case(case_id))
    array, _, props = preprocess(image, None, plan)
    probs = [m.probabilities(array, mirror) for m in ensemble.members]  # each fold once
    labels_of = lambda p: planning.label_map(restore_geometry(p, props, regions=regions), plan)
    scored = lambda seg: {"case": case_id, "metrics": seg_metrics.segmentation_metrics(
        seg, label.array, label.spacing, classes, plan.get("ignore_label"))}
    own = [labels_of(p) for p in probs[:n_own]]
    for k in range(1, n_own):  # the other folds alone, unprocessed
      single[k].append(scored(own[k]))
    agreement.append(fold_agreement(own, classes))
    for subset, subset_rows in subsets.items():
      subset_rows.append(scored(labels_of(np.mean([probs[i] for i in subset], 0))))
    means = [("fold0", own[0]), ("ensemble", labels_of(np.mean(probs[:n_own], 0)))]
    if also:
      means.append(("combined", labels_of(np.mean(probs, 0))))
    for name, labels in means:
      rows[name].append(scored(labels))
      rows[name + "+pp"].append(scored(pp.apply_postprocessing(labels, decision)))
  scores = {v: score_cases(rows[v], classes, n_boot, names) for v in variants}
  diffs = {"raw": paired_difference([rows["fold0"]], rows["ensemble"], n_boot),
           "postprocessed": paired_difference([rows["fold0+pp"]], rows["ensemble+pp"], n_boot)}
  # Fold 0 may be the best or the worst fold: the ensemble against the average single fold too.
  folds = [_fg(r, range(len(r))) for r in single]
  sizes = ensemble_sizes({**{(k,): r for k, r in enumerate(single)}, **subsets,
                          tuple(range(n_own)): rows["ensemble"]})
  over_mean = paired_difference(single, rows["ensemble"], n_boot)
  combined = ({"raw": paired_difference([rows["fold0"]], rows["combined"], n_boot),
               "postprocessed": paired_difference([rows["fold0+pp"]], rows["combined+pp"], n_boot)}
              if also else None)
  out = os.path.join(folder, "crossval", "holdout")
  os.makedirs(out, exist_ok=True)
  write_variant_rows(os.path.join(out, "results.csv"), rows, classes, names)
  header = "| Variant | " + " | ".join(f"{names[c]} Dice" for c in classes) + " | Mean Dice |"
  lines = [f"# Hold-out: {len(holdout)} cases kept out of every fold", "",
           f"Sliding window{' + mirroring' if mirror else ''}; post-processing (pp): "
           f"`postprocessing.json` of the cross-validation. Intervals: 95% bootstrap over cases, "
           f"{n_boot} resamples."]
  if also:
    lines.append(f"combined: the {n_own} folds here and the {len(runs) - n_own} of "
                 + ", ".join(f"`{os.path.abspath(a)}`" for a in also) + ", averaged.")
  lines += ["", header, "|---|" + "---:|" * (len(classes) + 1)]
  for v in variants:
    ci = scores[v]["dice_ci95"]
    cells = [f"{ci[names[c]]['value']:.4f} [{ci[names[c]]['lo']:.3f}, {ci[names[c]]['hi']:.3f}]"
             for c in classes]
    fg = ci["foreground"]
    lines.append(f"| {v} | " + " | ".join(cells) +
                 f" | {fg['value']:.4f} [{fg['lo']:.3f}, {fg['hi']:.3f}] |")
  lines += ["", "Each fold alone, mean Dice (unprocessed): " + ", ".join(
      f"fold {k} {v:.4f}" for k, v in enumerate(folds)) + f"; their mean {np.mean(folds):.4f}. "
      f"Ensemble minus the mean single fold (paired bootstrap over cases): "
      f"{over_mean['value']:+.4f} [{over_mean['lo']:+.4f}, {over_mean['hi']:+.4f}]", "",
      f"The folds agree with one another at mean Dice {np.nanmean(agreement):.4f} (every pair of "
      f"folds, unprocessed, averaged over pairs and cases) and with the reference at "
      f"{np.mean(folds):.4f}: where they agree, averaging them changes nothing.", "",
      "Ensembles of k folds, mean Dice (unprocessed, averaged over every choice of k folds): "
      + ", ".join(f"k={k} {v:.4f}" for k, v in sizes["curve"].items()) + "."]
  if sizes["projected"] is not None:
    lines[-1] += (f" Fitting a - b/k to these projects an unlimited ensemble of this recipe at "
                  f"{sizes['projected']['dice']:.4f} ({sizes['projected']['dice'] - folds[0]:+.4f}"
                  f" over fold 0), by this fit what more folds of the same recipe could reach.")
  for label, d_ in (("Ensemble", diffs), ("Combined", combined)):
    if d_ is not None:
      lines += ["", f"{label} minus fold 0, mean Dice (paired bootstrap over cases): " + ", ".join(
          f"{k} {d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for k, d in d_.items())]
  lines.append("")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines))
  result = {**{v: {k: s for k, s in scores[v].items() if k != "table"} for v in variants},
            "ensemble_minus_fold0": diffs, "single_folds": folds,
            "ensemble_minus_mean_fold": over_mean, "fold_agreement": float(np.nanmean(agreement)),
            "ensemble_sizes": sizes,
            "cases": len(holdout),
            **({"combined_minus_fold0": combined} if also else {}),
            "seconds": time.perf_counter() - t0}
  atomic_write_json(os.path.join(out, "summary.json"), result, indent=1, default=float)
  return result
