r"""Evaluates a finished run on one split, with bootstrap confidence intervals and plots.

  python -m medjax.evaluate --workdir runs/pneumonia --split val [--n_boot 1000 --threshold 0.5
                            --temperature --step N]
  python -m medjax.evaluate --cv runs/hippo_cv [--holdout [--holdout_also runs/hippo_cv2d]]
  python -m medjax.evaluate --choose runs/hippo_cv,runs/hippo_cv2d [--out runs/choice] [--holdout]

Classification runs: the best checkpoint predicts every case of the split (``--split test`` where
the data file has one), and ``workdir/evaluation/<split>/`` gets ``results.md`` (every figure with
its stratified 95% bootstrap interval), ``results.csv``, ``report.json``, ``predictions.csv`` and
plots: ROC with a CI band, precision-recall, reliability diagram, confusion matrix, and for
slice-sequence models the attention each case gave each slice (``slice_attention.npy`` + plot).
``--temperature`` fits temperature scaling on the val split and applies it before scoring.
Segmentation runs: the fold's sliding-window validation (`medjax.infer.segment.validate`), whose
``results.md`` section gains Dice intervals and a per-class Dice box plot.
Cross-validation folders (``--cv``, one segmentation run per fold): the out-of-fold predictions of
every training case scored together, and the post-processing decided on them
(`medjax.evaluate.crossval`); ``--holdout`` adds fold 0 vs the fold ensemble on ``data.holdout``.
Several cross-validation folders (``--choose``, one per config): each config and each ensemble of
them scored out of fold, the best chosen and its post-processing decided
(`medjax.evaluate.choice`), as nnU-Net's ``find_best_configuration``; ``--holdout`` then tests
every candidate and the chosen one post-processed on ``data.holdout``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from absl import app, flags, logging

from medjax.evaluate import classification as cls_metrics
from medjax.evaluate import report as report_lib
from medjax.io.errors import exit_on_users_error


def evaluate_classification(workdir: str, split: str = "val", *, step: int | None = None,
                            n_boot: int = cls_metrics.N_BOOT, seed: int = 0,
                            threshold: float = 0.5, temperature: bool = False) -> dict[str, Any]:
  """Scores a classification run on ``split``; writes ``workdir/evaluation/<split>/``.

  Returns:
    The report (`classification.classification_report`) with ``step`` and ``temperature``.
  """
  from medjax.infer.trained import TrainedModel

  trained = TrainedModel.load(workdir, step)
  if trained.task.name == "multilabel_classification":
    return _evaluate_multilabel(trained, split, n_boot=n_boot, seed=seed, threshold=threshold)
  if trained.task.name != "classification":
    raise ValueError(f"{trained.workdir}: a {trained.task.name} run; this report is for "
                     "classification")
  pred = trained.predict(trained.source(split))
  labels, probs = pred["label"].reshape(-1), pred["probs"]
  fitted = None
  if temperature:
    val = pred if split == "val" else trained.predict(trained.source("val"))
    fitted = cls_metrics.fit_temperature(val["label"].reshape(-1), np.log(val["probs"] + 1e-12))
    probs = cls_metrics.apply_temperature(np.log(probs + 1e-12), fitted)
  report = cls_metrics.classification_report(labels, probs, threshold=threshold, n_boot=n_boot,
                                             seed=seed, class_names=trained.class_names)
  report = {**report, "step": trained.step, "split": split, "temperature": fitted}

  out = os.path.join(trained.workdir, "evaluation", split)
  plots = os.path.join(out, "plots")
  os.makedirs(plots, exist_ok=True)
  title = f"{trained.config.data.name} {split}"
  names = list(trained.class_names)
  cls_metrics.plot_roc(labels, probs, os.path.join(plots, "roc.png"), title, n_boot=n_boot,
                       seed=seed, class_names=names)
  cls_metrics.plot_pr(labels, probs, os.path.join(plots, "pr.png"), title, class_names=names)
  cls_metrics.plot_reliability(labels, probs, os.path.join(plots, "reliability.png"), title)
  cls_metrics.plot_confusion(labels, probs, os.path.join(plots, "confusion.png"), title,
                             threshold=threshold, class_names=names)
  attention_md = []
  if "slice_attention" in pred:  # slice-sequence models: which slices drove each decision
    np.save(os.path.join(out, "slice_attention.npy"), pred["slice_attention"])
    report_lib.plot_slice_attention(pred["slice_attention"], labels, probs,
                                    os.path.join(plots, "slice_attention.png"), names, title)
    attention_md = ["Attention over slices per case (`slice_attention.npy`, rows in "
                    "`predictions.csv` order):", "", "![attention](plots/slice_attention.png)",
                    ""]
  with open(os.path.join(out, "predictions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["index", "label", *(f"p_{n}" for n in names)])
    for i, y, p in zip(pred["index"], labels, probs):
      w.writerow([int(i), int(y), *(f"{v:.6f}" for v in p)])
  scaled = f", temperature {fitted:.3f} fitted on val" if fitted else ""
  header = [f"# {trained.config.data.name} / {trained.config.model.name}: {split} split", "",
            f"Checkpoint step {trained.step}; {len(labels)} cases; threshold {threshold}{scaled}. "
            f"Intervals: 95% stratified bootstrap, {n_boot} resamples, seed {seed}."]
  _write_tables(out, report, header,
                ["![ROC](plots/roc.png) ![PR](plots/pr.png) ![reliability](plots/reliability.png) "
                 "![confusion](plots/confusion.png)", ""] + attention_md)
  return report


def _write_tables(out: str, report: dict[str, Any], header: list[str], figures: list[str]):
  """``results.csv``, ``report.json`` and ``results.md`` (header, table, figures) in ``out``."""
  cls_metrics.write_csv(report, os.path.join(out, "results.csv"))
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(header + ["", cls_metrics.format_table(report), ""] + figures))


def _evaluate_multilabel(trained, split: str, *, n_boot: int, seed: int,
                         threshold: float) -> dict[str, Any]:
  """Multi-label runs: every label scored as its own binary task (`multilabel_report`)."""
  pred = trained.predict(trained.source(split))
  labels, probs = pred["label"], pred["probs"]
  names = list(trained.class_names)
  report = cls_metrics.multilabel_report(labels, probs, threshold=threshold, n_boot=n_boot,
                                         seed=seed, label_names=names)
  report = {**report, "step": trained.step, "split": split, "temperature": None}
  out = os.path.join(trained.workdir, "evaluation", split)
  os.makedirs(os.path.join(out, "plots"), exist_ok=True)
  cls_metrics.plot_roc(labels, probs, os.path.join(out, "plots", "roc.png"),
                       f"{trained.config.data.name} {split}", class_names=names)
  with open(os.path.join(out, "predictions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["index", *(f"label_{n}" for n in names), *(f"p_{n}" for n in names)])
    for i, y, p in zip(pred["index"], labels, probs):
      w.writerow([int(i), *(int(v) for v in y), *(f"{v:.6f}" for v in p)])
  header = [f"# {trained.config.data.name} / {trained.config.model.name}: {split} split "
            "(multi-label)", "",
            f"Checkpoint step {trained.step}; {len(labels)} cases; each label at threshold "
            f"{threshold}. Intervals: 95% bootstrap over cases, {n_boot} resamples, seed {seed}."]
  _write_tables(out, report, header, ["![ROC](plots/roc.png)", ""])
  return report


@exit_on_users_error
def main(argv):
  del argv
  args = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax reports every read at INFO
  if args.holdout_also and not args.holdout:
    raise ValueError("--holdout_also adds to the hold-out comparison: give --holdout too")
  if args.holdout_also and args.choose:
    raise ValueError("--holdout_also is for --cv; --choose --holdout scores every folder it names")
  if args.out and not args.choose:
    raise ValueError("--out is where --choose writes: give --choose too")
  if args.choose:
    from medjax.evaluate import choice

    result = choice.choose_configuration(args.choose.split(","), args.out, n_boot=args.n_boot,
                                         mirror=not args.no_mirror, holdout=args.holdout)
    print(f"{result['cases']} cases out of fold, mean foreground Dice: " + ", ".join(
        f"{c['name']} {c['foreground_dice']:.4f}" for c in result["candidates"])
          + f"; chosen: {result['chosen']}, written to "
          + os.path.abspath(args.out or choice.default_out(args.choose.split(","))))
    if args.holdout:
      held = result["holdout"]
      print(f"hold-out ({held['cases']} cases) mean Dice: " + ", ".join(
          f"{v} {s['foreground_dice']:.4f}" for v, s in held["variants"].items()))
    return
  if args.cv:
    from medjax.evaluate import crossval

    result = crossval.evaluate_cv(args.cv, n_boot=args.n_boot)
    print(f"cross-validation: {result['cases']} cases out of fold, mean foreground Dice "
          f"{result['raw']['foreground_dice']:.4f} ({result['postprocessed']['foreground_dice']:.4f}"
          f" post-processed, keeping the largest component of {result['postprocessing'] or 'none'})"
          f"; written to {os.path.join(os.path.abspath(args.cv), 'crossval')}")
    if args.holdout:
      held = crossval.evaluate_holdout(args.cv, n_boot=args.n_boot, mirror=not args.no_mirror,
                                       also=args.holdout_also)
      print("hold-out (" + str(held["cases"]) + " cases) mean Dice: " + ", ".join(
          f"{v} {held[v]['foreground_dice']:.4f}" for v in crossval.HOLDOUT_VARIANTS if v in held)
            + f"; each fold alone {min(held['single_folds']):.4f}–{max(held['single_folds']):.4f}")
    return
  if args.holdout or args.holdout_also:
    raise ValueError("--holdout evaluates cross-validation folders: give it with --cv or --choose")
  from medjax.infer.trained import read_run_config

  task = read_run_config(args.workdir).get("task")
  if task == "segmentation":
    from medjax.infer.segment import validate

    result = validate(args.workdir, mirror=not args.no_mirror, n_boot=args.n_boot)
    print(json.dumps(result, default=float))
    return
  report = evaluate_classification(args.workdir, args.split, step=args.step, n_boot=args.n_boot,
                                   seed=args.seed, threshold=args.threshold,
                                   temperature=args.temperature)
  print(cls_metrics.format_table(report))
  print(f"written to {os.path.join(os.path.abspath(args.workdir), 'evaluation', args.split)}")


if __name__ == "__main__":  # flags defined here only, so importing the module defines none
  from medjax import host

  host.keep_freed_memory()  # before JAX starts (see medjax/host.py)
  flags.DEFINE_string("workdir", None, "a finished medjax run")
  flags.DEFINE_string("cv", None, "a cross-validation folder (one segmentation run per fold)")
  flags.DEFINE_string("choose", None, "cross-validation folders, one per config (a,b): choose "
                       "the best config or ensemble of them out of fold")
  flags.mark_flags_as_mutual_exclusive(["workdir", "cv", "choose"], required=True)
  flags.DEFINE_string("out", None, "--choose: where to write (default: beside the first folder)")
  flags.DEFINE_bool("holdout", False, "--cv: also fold 0 vs the fold ensemble on data.holdout; "
                    "--choose: also every candidate on it")
  flags.DEFINE_multi_string("holdout_also", [], "--holdout: another cross-validation folder "
                            "(e.g. the 2-D folds) whose folds join the ensemble as 'combined'")
  flags.DEFINE_string("split", "val", "train | val | test (classification)")
  flags.DEFINE_integer("step", None, "checkpoint step (default: best on validation)")
  flags.DEFINE_integer("n_boot", cls_metrics.N_BOOT, "bootstrap resamples")
  flags.DEFINE_integer("seed", 0, "bootstrap seed")
  flags.DEFINE_float("threshold", 0.5, "binary decision threshold")
  flags.DEFINE_bool("temperature", False, "fit temperature scaling on val and apply it first")
  flags.DEFINE_bool("no_mirror", False, "segmentation: skip mirroring TTA")
  app.run(main)
