"""Segmentation inference on a trained workdir: sliding window + mirroring, in the image's geometry.

`Segmenter` loads a run's best checkpoint and plan; `Segmenter.predict` takes a Volume, applies
the plan's preprocessing (never re-typed: read from ``plan.json``), predicts with the
Gaussian-weighted sliding window (and all-axis mirroring), and returns class probabilities on
the input's own grid. `validate` does that for every case of the run's validation fold, scores
per-class Dice/IoU/HD95/MSD in millimetres against the reference, writes each prediction as a
NIfTI label map in the input file's orientation, overlay PNGs, and a table in ``results.md``.

  python -m medjax.infer.segment --workdir runs/hippocampus3d [--no_mirror]
"""

from __future__ import annotations

import csv
import functools
import json
import os
import time
from typing import Any, Sequence

import matplotlib
import nibabel as nib
import numpy as np
import tqdm
from absl import app, flags, logging

from medjax import planning
from medjax.infer.sliding_window import sliding_window_predict
from medjax.infer.trained import TrainedModel
from medjax.io import msd
from medjax.io.errors import exit_on_users_error
from medjax.io.nifti import write_nifti
from medjax.io.volume import Volume
from medjax.metrics import segmentation as seg_metrics
from medjax.planning.preprocessing import preprocess, restore_geometry
from medjax.planning.regions import sigmoid_
from medjax.train import builders, runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plan_channels(plan: dict[str, Any]) -> tuple[str, ...]:
  """The run's input channel (modality) names in input order; plans written before they were
  recorded name them ``channel <k>``."""
  return tuple(plan.get("channels") or
               (f"channel {k}" for k in range(len(plan["normalization"]))))


def missing_channels(run_channels: Sequence[str], given: Sequence[str], fill_missing: bool = False,
                     trained_with_dropout: bool = False) -> list[str]:
  """The run's channels absent from ``given`` (the input's channel names), checked.

  Raises:
    ValueError: names the run does not know (or repeated), a missing channel (named) without
      ``fill_missing``, filling for a run trained without modality dropout, or nothing given.
  """
  run_channels, given = tuple(run_channels), tuple(given)
  unknown = [c for c in given if c not in run_channels]
  missing = [c for c in run_channels if c not in given]
  # Named channels the run does not take are left out when it has all its own (a FLAIR-only run
  # given FLAIR + T1); with one of its own missing, an unknown name may be a typo of it.
  if (unknown and missing) or len(set(given)) != len(given) or not given:
    raise ValueError(f"input channel(s) {', '.join(unknown or given) or '(none)'} unknown, "
                     f"repeated or absent; the run takes {', '.join(run_channels)}")
  if missing and not fill_missing:
    raise ValueError(f"missing input channel {', '.join(missing)}: the run takes "
                     f"{', '.join(run_channels)} (in this order), the input has {len(given)} "
                     f"({', '.join(given)})")
  if missing and not trained_with_dropout:
    raise ValueError(f"cannot zero-fill channel {', '.join(missing)}: the run was trained "
                     "without train.modality_dropout, so a zero channel is out of its training")
  return missing


def match_channels(image: Volume, run_channels: Sequence[str],
                   channels: Sequence[str] | None = None, fill_missing: bool = False,
                   trained_with_dropout: bool = False) -> Volume:
  """``image`` with its channels in the run's order, missing ones zero-filled when asked.

  Args:
    image: ``[i, j, k, C]``.
    run_channels: the run's channel names (`plan_channels`).
    channels: the names of ``image``'s channels; None: the run's first ``C``, in order.
    fill_missing: zero-fill the run's channels that ``image`` lacks (zero is what
      ``train.modality_dropout`` trained the model to read as "absent": z-scored channels only).
    trained_with_dropout: the run trained with ``train.modality_dropout > 0``; filling needs it.

  Raises:
    ValueError: as `missing_channels`, or channel names that do not fit ``image``.
  """
  run_channels = tuple(run_channels)
  if not channels and image.channels > len(run_channels):
    raise ValueError(f"the input has {image.channels} channel(s); the run takes "
                     f"{len(run_channels)} ({', '.join(run_channels)})")
  given = tuple(channels) if channels else run_channels[:image.channels]
  if len(given) != image.channels:
    raise ValueError(f"{len(given)} channel name(s) ({', '.join(given)}) for an input with "
                     f"{image.channels} channel(s)")
  if given == run_channels:
    return image
  missing_channels(run_channels, given, fill_missing, trained_with_dropout)
  zeros = np.zeros(image.array.shape[:-1] + (1,), image.array.dtype)
  parts = [image.array[..., given.index(c), None] if c in given else zeros for c in run_channels]
  return image.replace(array=np.concatenate(parts, axis=-1))


class Segmenter:
  """A trained segmentation model with its plan, ready to predict whole images."""

  def __init__(self, workdir: str, step: int | None = None, batch_size: int = 4):
    trained = TrainedModel.load(workdir, step)
    if trained.plan is None:
      raise ValueError(f"{trained.workdir}: not a segmentation run (no plan.json)")
    self.workdir, self.config, self.plan = trained.workdir, trained.config, trained.plan
    self.step = trained.step
    self.apply = trained.logits
    self.batch_size = batch_size
    self.postprocessing = None  # a keep-largest-component decision predict applies, if any

  @property
  def trained_with_dropout(self) -> bool:
    """Whether the run trained with ``train.modality_dropout`` (older runs: without)."""
    return float(self.config.train.get("modality_dropout", 0.0)) > 0

  @property
  def channels(self) -> tuple[str, ...]:
    """The run's input channel (modality) names, in input order."""
    return plan_channels(self.plan)

  def preprocess(self, image: Volume, channels: Sequence[str] | None = None,
                 fill_missing: bool = False) -> tuple[Volume, np.ndarray, dict[str, Any]]:
    """``image`` → (its canonical Volume, the plan's preprocessed array ``[*spatial, C]``, the
    properties `restore_geometry` needs); channels as in `predict`."""
    image = match_channels(image, self.channels, channels, fill_missing,
                           self.trained_with_dropout)
    canonical = image.to_canonical()
    array, _, props = preprocess(canonical, None, self.plan)
    return canonical, array, props

  def probabilities(self, array: np.ndarray, mirror: bool = True,
                    overlap: float = 0.5) -> np.ndarray:
    """Output probabilities ``[*spatial, K]`` of a preprocessed array, on its (preprocessed)
    grid: the Gaussian-weighted sliding window, with all-axis mirroring when ``mirror``; a
    softmax over the classes, or a sigmoid per region for region-based runs."""
    patch, k = self.plan["patch_size"], planning.output_channels(self.plan)
    regions = planning.plan_regions(self.plan) is not None
    window = functools.partial(sliding_window_predict, self.apply, patch_size=patch,
                               num_classes=k, overlap=overlap, batch_size=self.batch_size,
                               return_logits=regions)
    if self.plan["dims"] == 3:
      out = window(array, mirror_axes=(0, 1, 2) if mirror else ())
    else:  # 2-D plans: slice by slice along the plan's axis, each slice a 2-D sliding window.
      axis = self.plan["slice_axis"]
      out = np.stack([window(np.take(array, n, axis=axis), mirror_axes=(0, 1) if mirror else ())
                      for n in range(array.shape[axis])], axis=axis)
    return sigmoid_(out) if regions else out

  def predict(self, image: Volume, mirror: bool = True, overlap: float = 0.5,
              channels: Sequence[str] | None = None, fill_missing: bool = False) -> Volume:
    """Class probabilities ``[i, j, k, K]`` on ``image``'s own grid (any orientation).

    ``channels`` names ``image``'s channels (default: the run's, in order); ``fill_missing``
    zero-fills the ones it lacks, for runs trained with ``train.modality_dropout``
    (`match_channels`, which also raises the missing-channel error)."""
    canonical, array, props = self.preprocess(image, channels, fill_missing)
    restored = restore_geometry(self.probabilities(array, mirror, overlap), props,
                                regions=planning.plan_regions(self.plan) is not None)
    return Volume.from_affine(restored, canonical.affine).reoriented(image.affine)


def _overlay(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, path: str, title: str) -> None:
  """The slice with most reference foreground: image, reference and prediction contours."""
  axis = 2
  k = int(np.argmax(np.sum(ref > 0, axis=tuple(a for a in range(3) if a != axis))))
  fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
  for ax, labels, name in ((axes[0], ref, "reference"), (axes[1], pred, "prediction")):
    ax.imshow(image[:, :, k].T, cmap="gray", origin="lower")
    masked = np.ma.masked_equal(labels[:, :, k].T, 0)
    ax.imshow(masked, cmap="tab10", alpha=0.45, origin="lower", vmin=0, vmax=9,
              interpolation="nearest")
    ax.set_title(name)
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def validate(workdir: str, mirror: bool = True, overlays: int = 3,
             n_boot: int = 1000) -> dict[str, Any]:
  """Predicts every case of the run's validation fold and scores it (see module docstring);
  mean Dice gets a bootstrap interval over cases (``n_boot`` resamples)."""
  segmenter = Segmenter(workdir)
  config, plan = segmenter.config, segmenter.plan
  dataset = builders.msd_dataset(config.data)
  with open(os.path.join(segmenter.workdir, "splits.json")) as f:
    val_ids = json.load(f)[config.data.fold]["val"]
  out_dir = os.path.join(segmenter.workdir, "validation")
  os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
  classes, names = planning.scored_classes(plan), planning.scored_names(plan)
  cases, t0 = [], time.perf_counter()
  for n, case_id in enumerate(tqdm.tqdm(val_ids, desc="validate", unit="case")):
    case = dataset.case(case_id)
    image, label = msd.load_msd_case(dataset, case)  # both canonical
    probs = segmenter.predict(image, mirror=mirror)
    pred = probs.replace(array=planning.label_map(probs.array, plan))
    # Written the way the input file stores its axes (read from its header only).
    write_nifti(pred.reoriented(nib.load(case.images[0]).affine),
                os.path.join(out_dir, f"{case_id}.nii.gz"))
    metrics = seg_metrics.segmentation_metrics(pred.array, label.array, label.spacing, classes,
                                               plan.get("ignore_label"))
    cases.append({"case": case_id,
                  **{seg_metrics.class_key(c): m for c, m in metrics.items()}})
    if n < overlays:
      _overlay(image.array[..., 0], label.array[..., 0], pred.array[..., 0],
               os.path.join(out_dir, "overlays", f"{case_id}.png"),
               f"{case_id}: " + ", ".join(f"{names[c]} Dice {metrics[c]['dice']:.3f}"
                                           for c in classes))
  seconds = time.perf_counter() - t0
  per_case = [{c: r[seg_metrics.class_key(c)] for c in classes} for r in cases]
  summary = seg_metrics.summarize(per_case)
  table = seg_metrics.format_table(summary, names)
  ci = seg_metrics.bootstrap_means(per_case, "dice", n_boot=n_boot, seed=0)
  seg_metrics.plot_dice_boxes(per_case, os.path.join(out_dir, "dice_boxes.png"), names,
                              title=f"fold {config.data.fold}, {len(cases)} cases")
  result = {"step": segmenter.step, "fold": config.data.fold, "cases": len(cases),
            "mirror": mirror, "seconds": seconds, "foreground_dice": summary.foreground_dice,
            "per_class_dice": {names[c]: summary.mean[c]["dice"] for c in classes},
            "dice_ci95": {**{names[c]: ci["per_class"][c] for c in classes},
                          "foreground": ci["foreground"]}}
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:  # one row per case × class
    w = csv.writer(f)
    w.writerow(["case", "class", *seg_metrics.METRICS])
    for r in cases:
      for c in classes:
        w.writerow([r["case"], names[c],
                    *(r[seg_metrics.class_key(c)][m] for m in seg_metrics.METRICS)])
  lines = ["", f"## Validation, fold {config.data.fold} ({len(cases)} cases, sliding window"
           f"{' + mirroring' if mirror else ''}, checkpoint step {segmenter.step})", "",
           table, "", "Mean Dice with a 95% bootstrap interval over cases (" + ", ".join(
               f"{name} {iv['value']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"
               for name, iv in result["dice_ci95"].items()) + f"; {n_boot} resamples).", "",
           f"Inference wall time {seconds:.0f} s. Predictions: `validation/*.nii.gz`.", "",
           "![Dice per case](validation/dice_boxes.png)"
           ] + [f"![{c}](validation/overlays/{c}.png)" for c in val_ids[:overlays]] + [""]
  with open(os.path.join(segmenter.workdir, "results.md"), "a") as f:
    f.write("\n".join(lines))
  # Last: a sweep counts a segmentation member finished from here.
  runs.mark_finished(segmenter.workdir, {**result, "per_case": cases}, runs.VALIDATION, indent=1)
  return result


@exit_on_users_error
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every read at INFO
  result = validate(flags.FLAGS.workdir, mirror=not flags.FLAGS.no_mirror)
  print(json.dumps({k: v for k, v in result.items()}, default=float))


if __name__ == "__main__":
  from medjax import host

  host.keep_freed_memory()  # before JAX starts (see medjax/host.py)
  flags.DEFINE_string("workdir", None, "a trained segmentation run", required=True)
  flags.DEFINE_bool("no_mirror", False, "skip mirroring test-time augmentation (8× faster 3-D)")
  app.run(main)
