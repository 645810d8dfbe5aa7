r"""Chooses between segmentation configurations and their ensembles on out-of-fold predictions,
as nnU-Net's ``find_best_configuration`` does.

  python -m medjax.evaluate --choose runs/hippo_cv,runs/hippo_cv2d [--out runs/choice] [--holdout]

Each named folder is one config's cross-validation (`medjax.infer.ensemble.fold_runs`; all split
alike). Every training case is predicted by each config's fold that did not train on it (sliding
window, mirroring unless ``--no_mirror``); the candidates are each config alone and every
ensemble of two or more configs that preprocess alike (the mean of their probabilities, as
`medjax.infer.ensemble.Ensemble` predicts). The best mean foreground Dice wins; the
keep-largest-component post-processing is then decided on its out-of-fold predictions. The
held-out cases (``data.holdout``) are never looked at. Written to ``--out`` (default: beside the
first folder, ``choice_<names>``): ``choice.json`` (the chosen folders; ``predict --workdir
<out>`` predicts with them and the decision), ``postprocessing.json``, ``results.md``,
``results.csv`` (one row per case × candidate × class), ``summary.json``. With ``--holdout``,
``holdout/`` tests the choice on ``data.holdout`` (`score_holdout`).
"""

from __future__ import annotations

import csv
import itertools
import os
import time
from typing import Any, Sequence

import numpy as np
import tqdm

from medjax import planning
from medjax.evaluate.crossval import (
  dataset_of,
  holdout_cases,
  paired_difference,
  read_splits,
  score_cases,
  write_variant_rows,
)
from medjax.infer.ensemble import (
  CHOICE_FILENAME,
  Ensemble,
  check_same_preprocessing,
  fold_runs,
  preprocessing_mismatch,
)
from medjax.io import msd
from medjax.io.atomic import atomic_write_json
from medjax.io.errors import MedjaxIOError
from medjax.metrics import bootstrap
from medjax.metrics import postprocessing as pp
from medjax.metrics import segmentation as seg_metrics
from medjax.planning.preprocessing import preprocess, restore_geometry


def candidates(plans: Sequence[dict[str, Any]],
               names: Sequence[str]) -> tuple[list[tuple[int, ...]], list[str]]:
  """The configs' indices alone and every combination of two or more whose plans preprocess
  alike; and a line for each combination left out because they do not (``names`` name them)."""
  kept, skipped = [], []
  for size in range(1, len(plans) + 1):
    for combo in itertools.combinations(range(len(plans)), size):
      diff = [d for i in combo[1:] for d in preprocessing_mismatch(plans[combo[0]], plans[i])]
      if diff:
        skipped.append(f"{'+'.join(names[i] for i in combo)} ({'; '.join(diff)})")
      else:
        kept.append(combo)
  return kept, skipped


def default_out(folders: Sequence[str]) -> str:
  """``choice_<name>+<name>`` beside the first folder."""
  names = "+".join(os.path.basename(os.path.abspath(f).rstrip(os.sep)) for f in folders)
  return os.path.join(os.path.dirname(os.path.abspath(folders[0])), f"choice_{names}")


def _preprocessed(image, plans: Sequence[dict[str, Any]]) -> list[tuple]:
  """``preprocess(image, None, plan)`` for each plan, run once per distinct preprocessing."""
  inputs: list[tuple] = []
  for plan in plans:
    same = [x for p, x in zip(plans, inputs) if not preprocessing_mismatch(p, plan)]
    inputs.append(same[0] if same else preprocess(image, None, plan))
  return inputs


def _label_map(probs: np.ndarray, plan: dict[str, Any], inputs: tuple) -> np.ndarray:
  """The label map of probabilities on ``plan``'s grid, put back on the case's own grid."""
  regions = planning.plan_regions(plan) is not None
  return planning.label_map(restore_geometry(probs, inputs[2], regions=regions), plan)


def choose_configuration(folders: Sequence[str], out: str | None = None,
                         n_boot: int = bootstrap.N_BOOT, mirror: bool = True,
                         holdout: bool = False) -> dict[str, Any]:
  """Scores every candidate on the out-of-fold predictions and writes the choice (module
  docstring).

  Args:
    folders: two or more cross-validation folders, one per config, split alike.
    out: where to write (default `default_out`).
    n_boot: bootstrap resamples for the intervals.
    mirror: mirroring at prediction.
    holdout: then score every candidate, and the chosen one post-processed, on the first
      folder's ``data.holdout`` cases against its fold 0 alone (`score_holdout`), into
      ``<out>/holdout/``; the choice is made before and does not change.

  Returns:
    The summary written to ``summary.json``: ``{"candidates": [{"name", "folders",
    "foreground_dice", "per_class", "dice_ci95", "best_minus_this"}], "chosen" (name),
    "postprocessing", "skipped", "cases", "seconds"}``, and with ``holdout`` ``"holdout"``
    (`score_holdout`'s result).

  Raises:
    MedjaxIOError: a folder that is not a cross-validation, or whose folds were split otherwise
      than the first folder's (naming its ``splits.json``); with ``holdout``, an empty
      ``data.holdout`` or a folder whose ``data.holdout`` lacks some of the first's cases.
  """
  folders = [os.path.abspath(f) for f in folders]
  if len(folders) < 2:
    raise ValueError(f"--choose compares configurations: give two or more cross-validation "
                     f"folders (got {len(folders)})")
  if len(set(folders)) < len(folders):
    raise ValueError(f"--choose names a folder twice: {', '.join(folders)}")
  out = os.path.abspath(out or default_out(folders))
  runs = [fold_runs(f) for f in folders]
  splits = read_splits(runs[0])
  for folder_runs in runs[1:]:
    if read_splits(folder_runs) != splits:
      raise MedjaxIOError(os.path.join(folder_runs[0], "splits.json"), (
          f"its folds differ from {os.path.basename(folders[0])}'s; configurations are compared "
          "on the same out-of-fold cases, so their folds must be split alike"))
  plans = [check_same_preprocessing(r) for r in runs]
  held = holdout_cases(folders[0], runs) if holdout else []  # refused before hours of work
  short = [os.path.basename(f) for f in folders]
  combos, skipped = candidates(plans, short)
  names = ["+".join(short[i] for i in c) for c in combos]
  models = [Ensemble(r) for r in runs]  # members in fold order
  dataset = dataset_of(runs[0][0])
  classes, class_names = planning.scored_classes(plans[0]), planning.scored_names(plans[0])
  rows: dict[str, list[dict]] = {n: [] for n in names}
  labels: dict[str, list[np.ndarray]] = {n: [] for n in names}
  refs = []
  t0 = time.perf_counter()
  cases = [(fold, case) for fold, split in enumerate(splits) for case in split["val"]]
  for fold, case_id in tqdm.tqdm(cases, desc="out of fold", unit="case"):
    image, label = msd.load_msd_case(dataset, dataset.case(case_id))
    refs.append(label.array)
    inputs = _preprocessed(image, plans)
    probs = [m.members[fold].probabilities(x[0], mirror) for m, x in zip(models, inputs)]
    for name, combo in zip(names, combos):
      seg = _label_map(np.mean([probs[i] for i in combo], 0), plans[combo[0]], inputs[combo[0]])
      labels[name].append(seg.astype(np.uint8))
      rows[name].append({"case": case_id, "fold": fold, "metrics": seg_metrics.segmentation_metrics(
          seg, label.array, label.spacing, classes, plans[combo[0]].get("ignore_label"))})
  scores = {n: score_cases(rows[n], classes, n_boot, class_names) for n in names}
  # The first of the best wins a tie: configurations before ensembles, as they cost less.
  chosen = max(names, key=lambda n: (scores[n]["foreground_dice"], -names.index(n)))
  best = combos[names.index(chosen)]
  decision = pp.determine_postprocessing(labels[chosen], refs, classes,
                                         plans[best[0]].get("ignore_label"))
  decision["class_names"] = {seg_metrics.class_key(c): n for c, n in class_names.items()}
  os.makedirs(out, exist_ok=True)
  # Relative to ``out``, so that the choice still holds when the runs' parent folder moves.
  decision["configurations"] = [os.path.relpath(folders[i], out) for i in best]
  pp.write_decision(os.path.join(out, pp.FILENAME), decision)
  atomic_write_json(os.path.join(out, CHOICE_FILENAME),
                    {"configurations": decision["configurations"], "name": chosen,
                     "foreground_dice": scores[chosen]["foreground_dice"],
                     "postprocessing": pp.FILENAME}, indent=1)
  table = []
  for name, combo in zip(names, combos):
    diff = (None if name == chosen else
            paired_difference([rows[name]], rows[chosen], n_boot))
    table.append({"name": name, "folders": [folders[i] for i in combo],
                  **{k: v for k, v in scores[name].items() if k != "table"},
                  "best_minus_this": diff})
  _write_report(out, table, chosen, decision, skipped, len(cases), n_boot, mirror, classes,
                class_names, plans[0]["class_names"], rows)
  result = {"candidates": table, "chosen": chosen, "postprocessing": decision["keep_largest"],
            "skipped": skipped, "cases": len(cases), "seconds": time.perf_counter() - t0}
  if holdout:
    result["holdout"] = score_holdout(
        os.path.join(out, "holdout"), dataset, held, models, plans, list(zip(names, combos)),
        chosen, decision, f"{short[0]} fold 0", n_boot, mirror)
  atomic_write_json(os.path.join(out, "summary.json"), result, indent=1, default=float)
  return result


def _write_report(out: str, table: list[dict], chosen: str, decision: dict[str, Any],
                  skipped: list[str], cases: int, n_boot: int, mirror: bool, classes, names,
                  label_names: Sequence[str], rows: dict[str, list[dict]]) -> None:
  """``results.md`` and ``results.csv`` of `choose_configuration`."""
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["case", "fold", "candidate", "class", *seg_metrics.METRICS])
    for name, cand_rows in rows.items():
      for r in cand_rows:
        for c in classes:
          w.writerow([r["case"], r["fold"], name, names[c],
                      *(r["metrics"][c][m] for m in seg_metrics.METRICS)])
  lines = [f"# Configurations and their ensembles, {cases} cases out of fold", "",
           f"Each case predicted by each configuration's fold that did not train on it (sliding "
           f"window{' + mirroring' if mirror else ''}); ensembles average the probabilities. "
           f"Intervals: 95% bootstrap over cases, {n_boot} resamples; the last column is the "
           "chosen candidate's mean Dice minus this one's, paired over cases.", "",
           "| Candidate | " + " | ".join(f"{names[c]} Dice" for c in classes)
           + " | Mean Dice | chosen − this |", "|---|" + "---:|" * (len(classes) + 2)]
  for cand in table:
    ci = cand["dice_ci95"]
    cells = [f"{ci[names[c]]['value']:.4f}" for c in classes]
    fg, d = ci["foreground"], cand["best_minus_this"]
    gap = "chosen" if d is None else f"{d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    lines.append(f"| {cand['name']} | " + " | ".join(cells)
                 + f" | {fg['value']:.4f} [{fg['lo']:.3f}, {fg['hi']:.3f}] | {gap} |")
  kept = ", ".join("+".join(label_names[v] for v in g)
                   for g in decision["keep_largest"]) or "nothing"
  before, after = decision["foreground_dice_before"], decision["foreground_dice_after"]
  lines += ["", f"**Chosen: {chosen}.** Post-processing decided on its out-of-fold predictions: "
            f"keep the largest component of {kept} (mean Dice {before:.5f} → {after:.5f}). "
            f"Predict with it: `python -m medjax.infer.predict --workdir {out} --input ...`."]
  if skipped:
    lines += ["", "Not ensembled (they preprocess differently): " + "; ".join(skipped)]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines + [""]))


def score_holdout(out: str, dataset: msd.MSDDataset, cases: Sequence[str],
                  models: Sequence[Ensemble],
                  plans: Sequence[dict[str, Any]], candidates_: Sequence[tuple[str, tuple]],
                  chosen: str, decision: dict[str, Any], reference: str, n_boot: int,
                  mirror: bool) -> dict[str, Any]:
  """The choice tested on held-out cases: every candidate (all folds of its configurations,
  their probabilities averaged, as ``predict`` ensembles them), the chosen one post-processed by
  its decision, and the first configuration's fold 0 alone (``reference``); writes ``out``'s
  ``results.md``, ``results.csv`` and ``summary.json``.

  Returns:
    ``{"variants": {name: {"foreground_dice", "per_class", "dice_ci95", "minus_reference"}},
    "reference", "chosen", "cases", "seconds"}``; ``minus_reference`` is the paired bootstrap
    interval of the variant's mean Dice minus the reference's (None for the reference).
  """
  t0 = time.perf_counter()
  classes, names = planning.scored_classes(plans[0]), planning.scored_names(plans[0])
  post = f"{chosen}, post-processed"
  variants = [reference] + [n for n, _ in candidates_] + [post]
  rows: dict[str, list[dict]] = {v: [] for v in variants}
  for case_id in tqdm.tqdm(cases, desc="hold-out", unit="case"):
    image, label = msd.load_msd_case(dataset, dataset.case(case_id))
    inputs = _preprocessed(image, plans)
    probs = [[fold.probabilities(x[0], mirror) for fold in m.members]
             for m, x in zip(models, inputs)]
    scored = lambda seg: {"case": case_id, "metrics": seg_metrics.segmentation_metrics(
        seg, label.array, label.spacing, classes, plans[0].get("ignore_label"))}
    rows[reference].append(scored(_label_map(probs[0][0], plans[0], inputs[0])))
    for name, combo in candidates_:
      seg = _label_map(np.mean([p for i in combo for p in probs[i]], 0), plans[combo[0]],
                       inputs[combo[0]])
      rows[name].append(scored(seg))
      if name == chosen:
        rows[post].append(scored(pp.apply_postprocessing(seg, decision)))
  table = {}
  for v in variants:
    score = {k: x for k, x in score_cases(rows[v], classes, n_boot, names).items() if k != "table"}
    score["minus_reference"] = (None if v == reference else
                                paired_difference([rows[reference]], rows[v], n_boot))
    table[v] = score
  os.makedirs(out, exist_ok=True)
  write_variant_rows(os.path.join(out, "results.csv"), rows, classes, names)
  lines = [f"# The choice on {len(cases)} held-out cases", "",
           f"Chosen out of fold: **{chosen}**; \"{post}\" applies its post-processing decision. "
           f"Each candidate averages the probabilities of all folds of its configurations (sliding "
           f"window{' + mirroring' if mirror else ''}). Intervals: 95% bootstrap over cases, "
           f"{n_boot} resamples; the last column is the variant's mean Dice minus {reference}'s, "
           "paired over cases.", "",
           "| Variant | " + " | ".join(f"{names[c]} Dice" for c in classes)
           + f" | Mean Dice | − {reference} |", "|---|" + "---:|" * (len(classes) + 2)]
  for v in variants:
    ci, d = table[v]["dice_ci95"], table[v]["minus_reference"]
    gap = "" if d is None else f"{d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    fg = ci["foreground"]
    cells = [f"{ci[names[c]]['value']:.4f} [{ci[names[c]]['lo']:.3f}, {ci[names[c]]['hi']:.3f}]"
             for c in classes]
    lines.append(f"| {v} | " + " | ".join(cells)
                 + f" | {fg['value']:.4f} [{fg['lo']:.3f}, {fg['hi']:.3f}] | {gap} |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines + [""]))
  result = {"variants": table, "reference": reference, "chosen": chosen, "cases": len(cases),
            "seconds": time.perf_counter() - t0}
  atomic_write_json(os.path.join(out, "summary.json"), result, indent=1, default=float)
  return result
