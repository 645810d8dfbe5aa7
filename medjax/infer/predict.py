r"""Prediction on new studies with a finished run: DICOM, NIfTI, PNG/JPEG in, tables and masks out.

  python -m medjax.infer.predict --workdir runs/pneumonia --input scans/ --output out/
      [--threshold 0.5] [--intensity auto] [--probabilities] [--no_mirror]
      [--saliency gradcam|gradient] [--nonfinite refuse|fill]
      [--channels FLAIR,T1] [--fill_missing_channels] [--postprocessing auto|none|FILE]

``--input`` is a DICOM series folder, a DICOM file, a NIfTI file, a PNG/JPEG image, or a folder
holding any of these; there each DICOM series (grouped by SeriesInstanceUID, wherever its files
lie) is one input and each NIfTI/PNG/JPEG file another. A bad input is reported (one line naming
the file and the problem, on stderr and in ``errors.csv``) and skipped; the exit status is then
`EXIT_SOME_FAILED`. An input with NaN or ±inf voxels is such a bad input (a network answers it with
a confident-looking, meaningless prediction); ``--nonfinite=fill`` predicts it instead with NaN
and -inf set to its channel's finite minimum and +inf to its maximum, and says so in the
``warning`` column (`medjax.io.volume.fill_nonfinite`).

Preprocessing is the run's own, read from its workdir, never re-typed:

* Classification (MedMNIST runs). Each input becomes what the MedMNIST files hold, uint8
  ``[H, W, C]`` (2-D) or ``[D, H, W, C]`` (3-D) at ``config.data.size``, and then goes through
  the run's eval transforms by the same pipeline function the training loop evaluated with. The
  conversion (`classification_input`): greyscale (or grey → RGB for the colour sets); intensities
  mapped to 0..255 (see `intensity_op`: uint8 kept, CT through a soft-tissue window, anything else
  its own 0.5–99.5 percentile range); 2-D: centre-cropped to a square and resized with
  antialiasing (MedMNIST's 2-D recipe); 3-D: the whole volume, in axial-stack order, resampled to
  ``size³``. The 3-D case is an approximation: MedMNIST3D cut its volumes around the organ at a
  fixed physical size, which a whole scan stretched to ``size³`` does not reproduce.
* Segmentation (runs with a ``plan.json``). `Segmenter.predict` applies the plan and returns
  probabilities on the input's own grid; written are ``<name>_seg.nii.gz`` (uint8 label map, the
  input's affine and axis order), with ``--probabilities`` ``<name>_probs.nii.gz`` (float32, one
  volume per class), and for DICOM input a DICOM-SEG ``<name>_seg.dcm`` (`write_dicom_seg`).
  An input's channels are the run's modalities in the run's order (``plan.json`` ``channels``);
  ``--channels`` names them otherwise. A missing one is an error naming it, unless
  ``--fill_missing_channels`` zero-fills it, which runs trained with ``train.modality_dropout``
  accept (`medjax.infer.segment.match_channels`).
  ``--workdir`` may also name several segmentation runs (``a,b``: folds, or 2-D and 3-D configs)
  or a cross-validation folder (its folds), or what ``evaluate --choose`` chose (its ``--out``
  folder: the chosen configurations' folds): an ensemble that averages their probabilities
  (`medjax.infer.ensemble`); such a folder's ``postprocessing.json`` (keep the largest
  component, decided out of fold) is applied unless ``--postprocessing=none``.

Outputs: ``predictions.csv`` (one row per input), ``errors.csv`` (one per failure, header only when
none failed), ``predict.json`` (the run, counts and settings); with ``--saliency``, an overlay
``saliency/<name>.png`` per classified input (`medjax.infer.saliency`).

Privacy: nothing read from a DICOM header except the acquisition facts of
`medjax.io.dicom.SAFE_METADATA` (here only Modality) reaches a CSV, the JSON, a log line or an
error message; error texts are scrubbed of the inputs' patient name, IDs and dates in case a
library quoted one. No UIDs are written either. The DICOM-SEG object is the exception by design:
the standard requires a segmentation to carry the Patient and General Study modules of its source
images (highdicom copies them), so a DICOM-SEG is as identifying as the series it annotates.
Paths are written relative to ``--input`` as given: folder names are the user's to choose.

This module runs the loop and the command line; finding and reading inputs is
`medjax.infer.inputs`, the classifier's input `medjax.infer.classification_input`, the DICOM-SEG
`medjax.io.dicom_seg`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import tqdm
from absl import app, flags, logging

from medjax.data.sources import ArraySource
from medjax.infer import saliency as saliency_lib
from medjax.infer.classification_input import (  # noqa: F401  (public here too)
    CT_WINDOW,
    check_intensity,
    classification_input,
    intensity_op,
)
from medjax.infer.ensemble import (
    Ensemble,
    check_same_preprocessing,
    labels_of,
    load_segmenter,
    resolve_runs,
)
from medjax.infer.inputs import (  # noqa: F401  (public here too)
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NONFINITE,
    Failure,
    Input,
    Scrubber,
    find_inputs,
    output_stem,
    read_input,
    read_picture,
)
from medjax.infer.segment import Segmenter, missing_channels
from medjax.infer.trained import TrainedModel, read_run_config
from medjax.io import medmnist
from medjax.io.dicom_seg import dicom_seg_frames, write_dicom_seg  # noqa: F401  (public here too)
from medjax.io.errors import EXIT_USERS_ERROR, MedjaxIOError, exit_on_users_error
from medjax.io.nifti import write_nifti
from medjax.io.volume import grid_mismatch

# Exit statuses: every input predicted; some inputs failed (the rest were written); nothing could
# run (a bad workdir, no inputs). A crash keeps Python's own 1.
EXIT_OK, EXIT_UNUSABLE, EXIT_SOME_FAILED = 0, EXIT_USERS_ERROR, 3


def _problem(error: Exception, item: Input, root: str) -> str:
  """The reason, naming the file at fault (relative to ``root``) where it is not the input."""
  if not isinstance(error, MedjaxIOError):
    return _detail(error)
  where = os.path.relpath(error.path, root) if os.path.isabs(error.path) else error.path
  where = os.path.basename(root) if where == "." else where
  return error.cause if where == item.name else f"{where}: {error.cause}"


def _detail(error: Exception) -> str:
  # Our own checks raise ValueError with a whole sentence; anything else keeps its type's name.
  return str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"


def _warn(item: Input, note: str | None) -> None:
  """One stderr line for an input predicted after a repair (its ``warning`` column says it too)."""
  if note:
    tqdm.tqdm.write(f"predict: {item.name}: warning: {note}", file=sys.stderr)


def _write_csv(path: str, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(header))
    writer.writeheader()
    writer.writerows(rows)


# Called after each batch of classified inputs, for --saliency (`saliency_lib.PredictHook`):
# receives the model, the uint8 record images [N, ...] it was given, those inputs, their
# probabilities [N, K] and the output folder, and writes what it likes there.
SaliencyHook = Callable[[TrainedModel, np.ndarray, Sequence[Input], np.ndarray, str], None]


def _classify(trained: TrainedModel, inputs: Sequence[Input], output: str,
              report: Callable[[Input, Exception | str], None], *, threshold: float, intensity: str,
              nonfinite: str, progress: bool,
              saliency: SaliencyHook | None) -> tuple[list[str], list[dict]]:
  data = trained.config.data
  info = medmnist.get_info(data.name, data.size)
  names = trained.class_names
  binary = not info.multi_label and len(names) == 2
  batch_size = max(1, min(trained.config.eval.batch_size, len(inputs)))
  header = ["input", "kind", "modality"] + [f"prob_{n}" for n in names] + [
      "predicted", "predicted_index", "threshold", "warning"]
  rows: list[dict[str, Any]] = []
  pending: list[tuple[Input, np.ndarray, str, str]] = []

  def flush():
    if not pending:
      return
    images = np.stack([image for _, image, _, _ in pending])
    # The run's eval transforms, applied by the pipeline function its evaluation used.
    source = ArraySource(images, np.zeros(len(images), np.int64), name="predict")
    probs = trained.predict(source, batch_size=batch_size, progress=False)["probs"]
    for (item, _, modality, warning), p in zip(pending, probs):
      row = {"input": item.name, "kind": item.kind, "modality": modality, "warning": warning,
             **{f"prob_{n}": f"{v:.6f}" for n, v in zip(names, p)}}
      if info.multi_label:
        chosen = [n for n, v in zip(names, p) if v >= threshold]
        row.update(predicted=";".join(chosen), predicted_index="", threshold=threshold)
      elif binary:
        k = int(p[1] >= threshold)
        row.update(predicted=names[k], predicted_index=k, threshold=threshold)
      else:
        k = int(np.argmax(p))
        row.update(predicted=names[k], predicted_index=k, threshold="argmax")
      rows.append(row)
    if saliency is not None:
      saliency(trained, images, [item for item, _, _, _ in pending], probs, output)
    pending.clear()

  for item in tqdm.tqdm(inputs, desc="predict", unit="input", disable=not progress,
                        dynamic_ncols=True):
    try:
      volume, note = read_input(item, nonfinite)
      image = classification_input(volume, data.size, info.ndim, info.n_channels, intensity)
    except Exception as e:  # noqa: BLE001 - one bad input must not stop the rest
      report(item, e)
      continue
    _warn(item, note)
    pending.append((item, image, volume.modality, note or ""))
    if len(pending) == batch_size:
      flush()
  flush()
  return header, rows


def _segment(segmenter: Segmenter | Ensemble, inputs: Sequence[Input], output: str,
             report: Callable[[Input, Exception | str], None], *, probabilities: bool, mirror: bool,
             segmentation_type: str, nonfinite: str, channels: Sequence[str] | None,
             fill_missing: bool, progress: bool) -> tuple[list[str], list[dict]]:
  plan = segmenter.plan
  filled = [c for c in segmenter.channels if channels and fill_missing and c not in channels]
  fill_note = f"zero-filled channel {', '.join(filled)}" if filled else ""
  names = list(plan["class_names"])
  algorithm = f"medjax {segmenter.config.model.name}"
  header = ["input", "kind", "modality", "segmentation", "probabilities", "dicom_seg"] + [
      f"ml_{n}" for n in names[1:]] + ["warning"]
  rows: list[dict[str, Any]] = []
  taken: set[str] = set()
  for item in tqdm.tqdm(inputs, desc="predict", unit="input", disable=not progress,
                        dynamic_ncols=True):
    try:
      if item.kind == "image":
        raise ValueError("segmentation runs take volumes (DICOM, NIfTI), not PNG/JPEG images")
      volume, note = read_input(item, nonfinite)
      # Checks the channels against the run's (a missing one is named), zero-fills when asked.
      probs = segmenter.predict(volume, mirror=mirror, channels=channels,
                                fill_missing=fill_missing)
      problem = grid_mismatch(volume, probs)
      if problem:  # Segmenter's contract; checked because a shifted mask fails silently
        raise RuntimeError(f"prediction is not on the input's grid: {problem}")
      # The argmax, post-processed as the run's (or cross-validation's) decision says.
      labels = labels_of(probs, plan, segmenter.postprocessing).replace(metadata={})
      stem = output_stem(item.name, taken)
      row = {"input": item.name, "kind": item.kind, "modality": volume.modality,
             "segmentation": f"{stem}_seg.nii.gz", "probabilities": "", "dicom_seg": "",
             "warning": "; ".join(w for w in (note, fill_note) if w)}
      write_nifti(labels, os.path.join(output, row["segmentation"]), dtype=np.uint8)
      if probabilities:
        row["probabilities"] = f"{stem}_probs.nii.gz"
        write_nifti(volume.replace(array=probs.array.astype(np.float32), metadata={}),
                    os.path.join(output, row["probabilities"]))
      ml = np.bincount(labels.array.ravel(), minlength=len(names)) * np.prod(volume.spacing) / 1e3
      row.update({f"ml_{n}": f"{ml[k]:.3f}" for k, n in enumerate(names) if k > 0})
      rows.append(row)
    except Exception as e:  # noqa: BLE001 - one bad input must not stop the rest
      report(item, e)
      continue
    _warn(item, note)
    if item.kind == "dicom":
      try:
        write_dicom_seg(labels, item.files, names, os.path.join(output, f"{stem}_seg.dcm"),
                        segmentation_type=segmentation_type, algorithm=algorithm)
        row["dicom_seg"] = f"{stem}_seg.dcm"
      except Exception as e:  # noqa: BLE001 - the NIfTI stands; the SEG failure is reported
        report(item, f"DICOM-SEG not written: {_detail(e)}")
  return header, rows


def predict(workdir: str | Sequence[str], input_path: str, output: str, *,
            step: int | None = None, threshold: float = 0.5, intensity: str = "auto",
            probabilities: bool = False, mirror: bool = True, segmentation_type: str = "BINARY",
            nonfinite: str = "refuse", channels: Sequence[str] | None = None,
            fill_missing: bool = False, postprocessing: str = "auto", progress: bool = True,
            saliency: SaliencyHook | None = None) -> dict[str, Any]:
  """Predicts every input at ``input_path`` with the run in ``workdir``; writes into ``output``.

  Args:
    workdir: a finished run (classification or segmentation). Segmentation also takes several
      runs, or a cross-validation folder (its folds), as an ensemble that averages their
      probabilities (`medjax.infer.ensemble`).
    input_path: a file or a folder (see the module docstring).
    output: the folder to write (created).
    step: the checkpoint to use (default: the best on validation).
    threshold: classification: the positive class's probability at or above which a binary (or
      each multi-label) prediction is positive; multi-class takes the argmax.
    intensity: classification: how intensities map onto 0..255 (`intensity_op`).
    probabilities: segmentation: also write the class probabilities.
    mirror: segmentation: mirroring test-time augmentation (8× the work in 3-D).
    segmentation_type: ``"BINARY"`` or ``"LABELMAP"`` DICOM-SEG (`write_dicom_seg`).
    nonfinite: inputs with NaN/±inf voxels: ``"refuse"`` them (a failure) or ``"fill"`` them
      (`medjax.io.volume.fill_nonfinite`; the row's ``warning`` says so).
    channels: segmentation: the names of the inputs' channels (default: the run's, in order);
      an input lacking one of the run's channels fails, naming it, unless ``fill_missing``.
    fill_missing: segmentation: zero-fill the run's channels missing from ``channels``; only
      for runs trained with ``train.modality_dropout`` (`medjax.infer.segment.match_channels`).
    postprocessing: segmentation: ``"auto"`` applies a cross-validation folder's
      ``postprocessing.json`` (keep the largest component where it helped out of fold);
      ``"none"`` nothing; else the path of such a decision to apply.
    progress: show a progress bar over inputs (stderr).
    saliency: classification: called after each batch (`SaliencyHook`).

  Returns:
    ``{"task", "inputs", "predicted", "failed", "failures": [Failure], "skipped_files"}``.

  Raises:
    MedjaxIOError: ``workdir`` is not a finished run, or ``input_path`` holds no inputs.
    ValueError: a bad setting, or ``output`` is the input folder.
  """
  if not 0.0 < threshold < 1.0:
    raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
  check_intensity(intensity)
  if segmentation_type.upper() not in ("BINARY", "LABELMAP"):
    raise ValueError(f"segmentation_type must be BINARY or LABELMAP, got {segmentation_type!r}")
  if nonfinite not in NONFINITE:
    raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
  input_path, output = os.path.abspath(input_path), os.path.abspath(output)
  if output == input_path:
    raise ValueError(f"{output}: write the outputs to another folder than the inputs' (a rerun "
                     "would take them for inputs)")
  runs = [workdir] if isinstance(workdir, str) else list(workdir)
  if not runs:
    raise ValueError("no run to predict with")
  # A folder that is no run (nor a cross-validation or choice folder): one error before any input
  # is read.
  segmentation = len(runs) > 1 or not os.path.isfile(os.path.join(runs[0], "config.json"))
  if not segmentation:
    segmentation = read_run_config(runs[0]).get("task") == "segmentation"
  if segmentation:  # a cross-validation folder's folds, and an ensemble's plans, checked here
    check_same_preprocessing(resolve_runs(runs)[0])
  inputs, failures, skipped = find_inputs(input_path, exclude=output)
  if not inputs and not failures:
    raise MedjaxIOError(input_path, "no DICOM, NIfTI, PNG or JPEG inputs found")
  os.makedirs(output, exist_ok=True)
  scrub = Scrubber(inputs)
  root = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
  unreadable = len(failures)  # files that claim to be inputs but are not readable as such
  for failure in failures:
    tqdm.tqdm.write(f"predict: {failure.input}: {failure.problem}", file=sys.stderr)

  def report(item: Input, error: Exception | str) -> None:
    text = error if isinstance(error, str) else _problem(error, item, root)
    # One line; relative paths (libraries quote absolute ones); no patient identity.
    problem = " ".join(scrub(text.replace(root + os.sep, "")).split())
    failures.append(Failure(item.name, problem))
    tqdm.tqdm.write(f"predict: {item.name}: {problem}", file=sys.stderr)

  with warnings.catch_warnings():
    # pydicom and highdicom warn about odd header values by quoting them (highdicom: any
    # one-word PatientName): every warning is shown scrubbed while predict runs.
    warnings.showwarning = lambda message, category, *_, **__: tqdm.tqdm.write(
        scrub(f"{category.__name__}: {message}"), file=sys.stderr)
    if segmentation:
      model = load_segmenter(runs, step, postprocessing=postprocessing)
      if channels or fill_missing:  # a bad channel setting fails once, not once per input
        missing_channels(model.channels, channels or model.channels, fill_missing,
                         model.trained_with_dropout)
      header, rows = _segment(model, inputs, output, report, probabilities=probabilities,
                              mirror=mirror, segmentation_type=segmentation_type,
                              nonfinite=nonfinite, channels=channels,
                              fill_missing=fill_missing, progress=progress)
    else:
      model = TrainedModel.load(runs[0], step)
      header, rows = _classify(model, inputs, output, report, threshold=threshold,
                               intensity=intensity, nonfinite=nonfinite, progress=progress,
                               saliency=saliency)
  _write_csv(os.path.join(output, "predictions.csv"), header, rows)
  _write_csv(os.path.join(output, "errors.csv"), ["input", "problem"],
             [dataclasses.asdict(f) for f in failures])
  summary = {"task": "segmentation" if segmentation else "classification",
             "inputs": len(inputs) + unreadable, "predicted": len(rows),
             "failed": len({f.input for f in failures}),
             "failures": failures, "skipped_files": skipped}
  settings = ({"probabilities": probabilities, "mirror": mirror,
               "dicom_seg_type": segmentation_type.upper(),
               "channels": list(channels) if channels else None,
               "fill_missing": fill_missing,
               "postprocessing": model.postprocessing} if segmentation else
              {"threshold": threshold, "intensity": intensity,
               # A hook's own settings (saliency.PredictHook has them), else that there was one.
               "saliency": getattr(saliency, "settings", None if saliency is None else "custom")})
  settings["nonfinite"] = nonfinite
  with open(os.path.join(output, "predict.json"), "w") as f:
    workdirs = model.workdirs if isinstance(model, Ensemble) else [model.workdir]
    json.dump({"workdir": workdirs[0] if len(workdirs) == 1 else workdirs, "step": model.step,
               "settings": settings,
               **{k: v for k, v in summary.items() if k != "failures"}}, f, indent=1)
  return summary


# --------------------------------------------------------------------------------------------
# Command line


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags on ``fv`` (tests pass their own `flags.FlagValues`)."""
  flags.DEFINE_list("workdir", None, "a finished run; segmentation: several (comma-separated) "
                    "or a cross-validation folder, ensembled", required=True, flag_values=fv)
  flags.DEFINE_string("input", None, "DICOM folder/file, NIfTI, PNG/JPEG, or a folder of them",
                      required=True, flag_values=fv)
  flags.DEFINE_string("output", None, "folder for predictions.csv, errors.csv and masks",
                      required=True, flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: best on validation)",
                       flag_values=fv)
  flags.DEFINE_float("threshold", 0.5, "binary/multi-label: positive at or above this",
                     flag_values=fv)
  flags.DEFINE_string("intensity", "auto", "classification intensity map onto 0..255: auto, "
                      "keep, percentile, a CT window preset or level,width", flag_values=fv)
  flags.DEFINE_bool("probabilities", False, "segmentation: also write <name>_probs.nii.gz",
                    flag_values=fv)
  flags.DEFINE_bool("no_mirror", False, "segmentation: skip mirroring (8× faster in 3-D)",
                    flag_values=fv)
  flags.DEFINE_enum("dicom_seg_type", "binary", ["binary", "labelmap"],
                    "DICOM-SEG segmentation type", flag_values=fv)
  flags.DEFINE_list("channels", None, "segmentation: names of the inputs' channels, e.g. FLAIR "
                    "(default: the run's, in order)", flag_values=fv)
  flags.DEFINE_bool("fill_missing_channels", False, "segmentation: zero-fill the run's channels "
                    "missing from --channels (runs trained with train.modality_dropout only)",
                    flag_values=fv)
  flags.DEFINE_string("postprocessing", "auto", "segmentation: auto (a cross-validation "
                      "folder's postprocessing.json), none, or a decision file to apply",
                      flag_values=fv)
  flags.DEFINE_enum("saliency", "none", ["none", *saliency_lib.METHODS],
                    "classification: write <output>/saliency/<input>.png overlays",
                    flag_values=fv)
  flags.DEFINE_enum("nonfinite", "refuse", list(NONFINITE), "inputs with NaN/inf voxels: refuse "
                    "them (errors.csv), or fill them from the finite range (NaN, -inf: minimum; "
                    "+inf: maximum) with a warning column", flag_values=fv)


@exit_on_users_error
def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every read at INFO
  summary = predict(fv.workdir, fv.input, fv.output, step=fv.step, threshold=fv.threshold,
                    intensity=fv.intensity, probabilities=fv.probabilities,
                    mirror=not fv.no_mirror, segmentation_type=fv.dicom_seg_type,
                    nonfinite=fv.nonfinite, channels=fv.channels,
                    fill_missing=fv.fill_missing_channels, postprocessing=fv.postprocessing,
                    saliency=saliency_lib.predict_hook(fv.saliency, threshold=fv.threshold))
  print(f"predict: {summary['predicted']} of {summary['inputs']} input(s) predicted, "
        f"{summary['failed']} failed; see {os.path.join(fv.output, 'predictions.csv')}"
        + (" and errors.csv" if summary["failed"] else ""), file=sys.stderr)
  return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


if __name__ == "__main__":
  from medjax import host

  host.keep_freed_memory()  # before JAX starts (see medjax/host.py)
  define_flags()
  app.run(main)
