"""Exports a finished run for serving: a StableHLO module with its weights, plus ``model.json``.

  python -m medjax.infer.export --workdir runs/pneumonia --out model/ [--step N] [--overwrite]
      [--precision float32]   # a bf16-trained run computing in float32 (default: the run's)

``--out`` receives ``model.stablehlo``, a serialised ``jax.export`` module with the weights baked
in as constants and a symbolic batch axis, lowered for CPU and CUDA, and ``model.json``, which
says what the module expects and returns and how to preprocess (see `export_trained`), with the
module's sha256 and a digest of itself (``manifest_sha256``) so that an edited or damaged export is
refused. Load it with ``medjax.infer.serving.load_exported``, which needs only jax and numpy.

Classification runs map preprocessed images ``[B, *spatial, C]`` to probabilities ``[B, K]``.
Segmentation runs map one preprocessed patch ``[B, *patch_size, C]`` to softmax probabilities
per voxel ``[B, *patch_size, K]``; the whole-volume sliding window (and the plan's crop,
normalisation and resampling) stays on the caller's side, since it is host-side tiling around the
network, not part of it. Note that ``medjax.infer.segment`` blends window *logits* and takes the
softmax once; blending the exported probabilities instead differs slightly where windows overlap.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from medjax import ops, planning
from medjax.infer import serving
from medjax.infer.trained import TrainedModel
from medjax.io import medmnist
from medjax.io.errors import exit_on_users_error

# CUDA lowering needs no GPU (it is StableHLO plus platform-specific custom calls), so one file
# serves a CPU box and a GPU server alike; the module picks its branch from the running backend.
PLATFORMS = ("cpu", "cuda")

# The exact numpy arithmetic of each transform the serving loader can replay, for readers of
# model.json who reimplement preprocessing in another language.
_FORMULAS = {
    "to_float": "x.astype(float32) * float32(scale)",
    "normalize": "((x - float32(mean)) / float32(std)).astype(float32)",
    "greyscale": "C=3: (x.astype(float32) @ float32(weights))[..., None]; C=1: x.astype(float32)",
}
_FILES = (serving.MODULE_FILE, serving.METADATA_FILE)


class OutputExistsError(FileExistsError):
  """The export folder holds something else (and ``overwrite`` is not set): the user's to fix."""

  users_error = True


def _op_record(spec: str, transform: Any) -> dict[str, Any]:
  """``{"op": name, **fields}`` of one parsed transform, its defaults spelled out."""
  record = {"op": spec.split("(")[0].strip()}
  for field in dataclasses.fields(transform):
    value = getattr(transform, field.name)
    record[field.name] = list(value) if isinstance(value, tuple) else value
  if record["op"] in _FORMULAS:
    record["formula"] = _FORMULAS[record["op"]]
  return record


def _classification(trained: TrainedModel) -> tuple[Callable, tuple[int, ...], dict[str, Any]]:
  """The serving function, its input shape and the MedMNIST preprocessing record."""
  data = trained.config.data
  info = medmnist.get_info(data.name, data.size)
  raw_shape = (data.size,) * info.ndim + (info.n_channels,)
  specs = [s for s in data.eval_transforms.split("|") if s.strip()]
  ops = trained.eval_transforms()
  record = {"image": np.zeros(raw_shape, np.uint8)}
  for spec, op in zip(specs, ops):
    if not isinstance(op, grain.transforms.Map):
      raise ValueError(f"{trained.workdir}: eval transform {spec!r} is random; an export needs "
                       "deterministic preprocessing")
    record = op.map(record)
  input_shape = tuple(record["image"].shape)
  preprocessing = {
      "kind": "medmnist",
      "data": {"name": data.name, "size": data.size},
      "raw": {"shape": list(raw_shape), "dtype": "uint8",
              "layout": "channels-last [*spatial, C]; grey sets store [*spatial] and gain C=1"},
      "eval_transforms": data.eval_transforms,
      "ops": [_op_record(s, op) for s, op in zip(specs, ops)],
  }
  def serve(images):
    return trained.forward(images)[0]

  return serve, input_shape, preprocessing


def _segmentation(trained: TrainedModel) -> tuple[Callable, tuple[int, ...], dict[str, Any]]:
  """The per-patch serving function, its input shape and the plan's preprocessing record."""
  plan = trained.plan
  input_shape = tuple(int(s) for s in plan["patch_size"]) + (len(plan["normalization"]),)
  keys = ("dims", "target_spacing", "patch_size", "slice_axis", "normalization",
          "foreground_intensity")
  preprocessing = {
      "kind": "msd_plan",
      "eval_transforms": trained.config.data.eval_transforms,
      "plan": {k: plan[k] for k in keys},
      "steps": [
          "reorient the image to canonical RAS, channels-last [i, j, k, C]",
          "crop to the bounding box of voxels where any channel is nonzero",
          "normalise each channel: 'ct' clips to the foreground p00_5..p99_5 and z-scores with "
          "foreground_intensity's mean/std (std floored at 1e-8); 'zscore' z-scores with the "
          "image's own mean/std (std floored at 1e-8)",
          "resample to target_spacing (linear for the image)",
          "3-D plans: tile the volume with patch_size windows; 2-D plans: tile each slice "
          "along slice_axis (medjax.infer.segment: half overlap, Gaussian-weighted blending of "
          "the windows' logits, one softmax at the end, mirroring on all axes by default)",
      ],
  }
  regions = planning.plan_regions(plan)
  if regions:  # region-based runs: a sigmoid per region, and how to make the label map
    preprocessing["regions"] = regions
    preprocessing["steps"].append(
        "region-based run: the outputs are a sigmoid per region; the label map starts at 0 and, "
        "region by region in order, takes the region's 'label' where its probability >= 0.5")

  def serve(patches):
    if regions:
      return jax.nn.sigmoid(trained.forward_logits(patches))
    return jax.nn.softmax(trained.forward_logits(patches), axis=-1)

  return serve, input_shape, preprocessing


def _is_same_model(out: str, trained: TrainedModel) -> bool:
  """Whether ``out`` holds only an earlier export of this very run and step."""
  if not set(os.listdir(out)) <= set(_FILES):
    return False
  try:
    with open(os.path.join(out, serving.METADATA_FILE)) as f:
      source = json.load(f).get("source", {})
  except (OSError, json.JSONDecodeError):
    return False
  return source.get("workdir") == trained.workdir and source.get("step") == trained.step


def _check_out(out: str, trained: TrainedModel, overwrite: bool) -> None:
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out) or os.path.islink(out):
    raise OutputExistsError(f"{out}: exists and is not a plain folder (a file or a link)")
  if overwrite or not os.listdir(out) or _is_same_model(out, trained):
    return
  raise OutputExistsError(f"{out}: not empty and not an export of {trained.workdir} step "
                        f"{trained.step}; pass --overwrite (overwrite=True) to replace it")


def _replace_folder(new: str, out: str) -> None:
  """Puts the finished folder ``new`` at ``out``; an old ``out`` is kept until that succeeded."""
  if not os.path.lexists(out):
    os.rename(new, out)
    return
  old = f"{out}.old-{uuid.uuid4().hex[:8]}"
  os.rename(out, old)
  try:
    os.rename(new, out)
  except BaseException:
    os.rename(old, out)
    raise
  shutil.rmtree(old)


def export_trained(trained: TrainedModel, out: str, *, overwrite: bool = False,
                   platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
  """Exports ``trained`` into the folder ``out`` (see the module docstring).

  The files are written into a temporary sibling folder that replaces ``out`` once complete, so
  an export that fails leaves ``out`` as it was.

  Args:
    trained: the loaded run.
    out: the export folder; created, or replaced when it is empty, holds an earlier export of
      the same run and step, or ``overwrite`` is set.
    overwrite: replace a folder that holds anything else.
    platforms: ``jax.export`` platforms to lower for.

  Returns:
    The metadata written to ``model.json``.

  Raises:
    FileExistsError: ``out`` holds something else and ``overwrite`` is not set.
  """
  out = os.path.abspath(out)
  _check_out(out, trained, overwrite)
  make = _segmentation if trained.plan is not None else _classification
  fn, input_shape, preprocessing = make(trained)
  (batch,) = jax.export.symbolic_shape("b")
  # XLA's own convolutions: the module must run where medjax's oneDNN handlers do not exist.
  with ops.portable():
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32))
  output_shape = [int(d) for d in exported.out_avals[0].shape[1:]]
  blob = exported.serialize()
  task = trained.task.name
  meaning = {"classification": "softmax probabilities per class",
             "multilabel_classification": "sigmoid probability per label",
             "segmentation": "softmax probabilities per class, per voxel of the patch"}[task]
  if task == "segmentation" and planning.plan_regions(trained.plan):
    meaning = "sigmoid probability per region, per voxel of the patch"
  metadata = {
      "format": serving.FORMAT,
      "format_version": serving.FORMAT_VERSION,
      "task": task,
      "input": {"shape": list(input_shape), "dtype": "float32",
                "layout": "[B, *spatial, C], channels-last; B is free (symbolic)"},
      "output": {"shape": output_shape, "dtype": "float32", "meaning": meaning},
      "class_names": list(trained.class_names),
      "preprocessing": preprocessing,
      "source": {"workdir": trained.workdir, "step": trained.step,
                 "model": trained.config.model.name, "precision": trained.precision},
      "jax_version": jax.__version__,
      "platforms": list(exported.platforms),
      "module": {"file": serving.MODULE_FILE, "sha256": None, "bytes": len(blob),
                 "calling_convention_version": exported.calling_convention_version},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
  try:
    module_path = os.path.join(tmp, serving.MODULE_FILE)
    with open(module_path, "wb") as f:
      f.write(blob)
    metadata["module"]["sha256"] = serving.sha256_file(module_path)
    metadata[serving.MANIFEST_KEY] = serving.manifest_digest(metadata)  # last: covers the rest
    with open(os.path.join(tmp, serving.METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=1)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
    _replace_folder(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return metadata


def export(workdir: str, out: str, step: int | None = None, *, overwrite: bool = False,
           platforms: Sequence[str] = PLATFORMS, precision: str | None = None) -> dict[str, Any]:
  """Loads ``workdir``'s run (checkpoint ``step``, default the best) and exports it to ``out``,
  computing in ``precision`` (default: the run's ``train.precision``; ``"float32"`` exports a
  bf16-trained run in float32).

  Raises:
    MedjaxIOError: ``workdir`` is not a finished run (names the missing file).
    FileExistsError: see `export_trained`.
  """
  return export_trained(TrainedModel.load(workdir, step, precision), out, overwrite=overwrite,
                        platforms=platforms)


@exit_on_users_error
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every read at INFO
  f = flags.FLAGS
  metadata = export(f.workdir, f.out, f.step, overwrite=f.overwrite, platforms=f.platforms,
                    precision=f.precision or None)
  print(json.dumps({"out": os.path.abspath(f.out), "task": metadata["task"],
                    "step": metadata["source"]["step"], "input_shape": metadata["input"]["shape"],
                    "platforms": metadata["platforms"], "bytes": metadata["module"]["bytes"]}))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "a finished medjax run", required=True)
  flags.DEFINE_string("out", None, "the export folder to write", required=True)
  flags.DEFINE_integer("step", None, "checkpoint step (default: best on validation, else latest)")
  flags.DEFINE_bool("overwrite", False, "replace an --out that holds something else")
  flags.DEFINE_list("platforms", list(PLATFORMS), "jax.export platforms to lower for")
  flags.DEFINE_enum("precision", "", ["", "float32", "bf16"],
                    "compute precision of the exported module (default: the run's "
                    "train.precision)")
  app.run(main)
