"""Loads a model exported by ``medjax.infer.export`` and runs it, with only jax and numpy.

Serving must not need the training stack, so this module imports nothing from medjax or flax:
copy it next to an export folder (``model.stablehlo`` + ``model.json``) and it runs anywhere jax
does (plus ``flatbuffers``, which jax needs to deserialise a module).

  model = load_exported("model/")
  probs = model(model.preprocess(raw_uint8_images))   # float32 [N, K]

  python serving.py model/     # (or python -m medjax.infer.serving) checks an export, says what
                               # it takes; a damaged or edited one: one ``error:`` line, exit 2

Integrity: ``model.json`` records the module's sha256 and ``manifest_sha256``, a digest of its own
canonical JSON (`manifest_digest`), so an edited preprocessing record, class list or module entry
is refused like a modified module; the module must be a file inside the export folder. These
digests catch edits and corruption, not forgery (anyone can recompute them): sign the folder where
that matters.

`preprocess` replays the run's recorded MedMNIST evaluation transforms in numpy, with the same
float32 arithmetic as ``medjax.data.transforms``. Segmentation exports take preprocessed patches;
their preprocessing (crop, normalise, resample) and the whole-volume sliding window stay with the
caller, as ``model.json`` describes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Callable

import jax
import numpy as np

FORMAT = "medjax.export"
# Bumped when model.json changes in a way an older loader would misread (2: manifest_sha256).
FORMAT_VERSION = 2
MODULE_FILE = "model.stablehlo"
METADATA_FILE = "model.json"
MANIFEST_KEY = "manifest_sha256"
# What the loader reads from model.json, as dotted paths, with their JSON types.
_REQUIRED = {"format": str, "format_version": int, "task": str, "input.shape": list,
             "output.shape": list, "class_names": list, "preprocessing": dict,
             "module.file": str, "module.sha256": str, MANIFEST_KEY: str}


class ExportError(ValueError):
  """An export folder that cannot be used: the message names the file and the problem."""


def sha256_file(path: str) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def manifest_digest(metadata: dict[str, Any]) -> str:
  """Hex sha256 of ``metadata``'s canonical JSON without its `MANIFEST_KEY`: keys sorted, no
  whitespace, ASCII (``json.dumps(..., sort_keys=True, separators=(",", ":"))``)."""
  body = {k: v for k, v in metadata.items() if k != MANIFEST_KEY}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode("ascii")).hexdigest()


# --- Preprocessing: numpy twins of medjax.data.transforms ops ----------------------------------
# Each takes the op's recorded fields (model.json "preprocessing.ops") and a float or uint8 batch
# [N, *spatial, C]. The float32 casts are where transforms.py has them, so results match bit for
# bit, not merely to rounding.


def _to_float(x: np.ndarray, scale: float) -> np.ndarray:
  return x.astype(np.float32) * np.float32(scale)


def _normalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


def _greyscale(x: np.ndarray, weights: tuple[float, float, float]) -> np.ndarray:
  if x.shape[-1] == 1:
    return x.astype(np.float32)
  if x.shape[-1] != 3:
    raise ValueError(f"greyscale: expects 1 or 3 channels, got {x.shape[-1]}")
  return (x.astype(np.float32) @ np.asarray(weights, np.float32))[..., None]


_OPS: dict[str, Callable[..., np.ndarray]] = {
    "to_float": _to_float,
    "normalize": _normalize,
    "greyscale": _greyscale,
}


class ExportedModel:
  """An exported medjax model: ``model(images) -> probabilities``.

  Attributes:
    folder: the export folder.
    metadata: ``model.json`` as a dict.
    exported: the deserialised ``jax.export.Exported``.
  """

  def __init__(self, folder: str, metadata: dict[str, Any], exported: jax.export.Exported):
    self.folder = folder
    self.metadata = metadata
    self.exported = exported
    # One jit per model: each new batch size compiles once, then reruns at jit speed.
    self._call = jax.jit(exported.call)

  @property
  def task(self) -> str:
    return self.metadata["task"]

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One preprocessed image's shape, channels-last, without the batch axis."""
    return tuple(self.metadata["input"]["shape"])

  @property
  def output_shape(self) -> tuple[int, ...]:
    return tuple(self.metadata["output"]["shape"])

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.metadata["class_names"])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Probabilities of preprocessed ``images [N, *input_shape]`` (any N, cast to float32).

    Returns:
      float32 ``[N, *output_shape]``: ``[N, K]`` for classification (softmax, or a sigmoid per
      label for multi-label runs), ``[N, *patch, K]`` softmax per voxel for segmentation.
    """
    images = np.asarray(images, np.float32)
    if images.shape[1:] != self.input_shape:
      raise ValueError(f"{self.folder}: expects images [N, {', '.join(map(str, self.input_shape))}]"
                       f", got shape {images.shape}")
    if not len(images):  # the module asserts a batch of at least 1
      return np.zeros((0, *self.output_shape), np.float32)
    return np.asarray(self._call(images), np.float32)

  def preprocess(self, raw: np.ndarray) -> np.ndarray:
    """Applies the run's recorded evaluation transforms to raw MedMNIST-style images.

    Args:
      raw: uint8 ``[N, *spatial]`` (grey) or ``[N, *spatial, C]``, as MedMNIST stores them.

    Returns:
      float32 ``[N, *input_shape]``, ready for ``__call__``.
    """
    spec = self.metadata["preprocessing"]
    if spec.get("kind") != "medmnist":
      raise NotImplementedError(
          f"{self.folder}: preprocess() replays MedMNIST transforms; this export's preprocessing "
          f"is {spec.get('kind')!r}, done by the caller as {METADATA_FILE} describes")
    raw = np.asarray(raw)
    shape = tuple(spec["raw"]["shape"])  # channels-last, as medjax's MedMNIST loader gives it
    if shape[-1] == 1 and raw.shape[1:] == shape[:-1]:
      raw = raw[..., None]
    if raw.shape[1:] != shape:
      raise ValueError(f"{self.folder}: expects raw images [N, {', '.join(map(str, shape))}] "
                       f"(or without the channel axis for grey sets), got shape {raw.shape}")
    x = raw
    for op in spec["ops"]:
      name, args = op["op"], {k: v for k, v in op.items() if k not in ("op", "formula")}
      if name not in _OPS:
        raise NotImplementedError(f"{self.folder}: preprocessing op {name!r} has no numpy "
                                  f"version here (known: {sorted(_OPS)})")
      x = _OPS[name](x, **args)
    return np.ascontiguousarray(x, np.float32)


def _read_metadata(meta_path: str) -> dict[str, Any]:
  """``model.json``, checked to be a medjax export this loader reads, with every required key."""
  try:
    with open(meta_path) as f:
      metadata = json.load(f)
  except FileNotFoundError:
    raise ExportError(f"{meta_path}: no such file (is the folder a medjax export?)") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    got = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
    raise ExportError(f"{meta_path}: not a medjax export (format {got!r})")
  version = metadata.get("format_version")
  if isinstance(version, int) and version > FORMAT_VERSION:
    raise ExportError(f"{meta_path}: format version {version} is newer than this loader's "
                      f"{FORMAT_VERSION}; use the serving.py that came with it")
  if isinstance(version, int) and version < FORMAT_VERSION:
    raise ExportError(f"{meta_path}: format version {version} predates the manifest digest this "
                      "loader checks; export the run again (python -m medjax.infer.export)")
  for key, kind in _REQUIRED.items():
    value = metadata
    for part in key.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    if value is None:
      raise ExportError(f"{meta_path}: no {key!r}; the file was edited or damaged since export")
    if not isinstance(value, kind) or isinstance(value, bool):
      raise ExportError(f"{meta_path}: {key!r} must be a JSON {kind.__name__}, got "
                        f"{type(value).__name__}")
  return metadata


def _module_path(folder: str, meta_path: str, name: str) -> str:
  """The module file named ``name`` in ``model.json``: refused unless it lies inside ``folder``
  (after resolving ``..``, absolute paths and symbolic links)."""
  path = os.path.realpath(os.path.join(folder, name))
  root = os.path.realpath(folder)
  if os.path.isabs(name) or os.path.commonpath([root, path]) != root or path == root:
    raise ExportError(f"{meta_path}: module file {name!r} lies outside the export folder "
                      f"({path}); an export is one self-contained folder")
  if not os.path.isfile(path):
    raise ExportError(f"{os.path.join(folder, name)}: no such file (named in {METADATA_FILE})")
  return path


def load_exported(folder: str) -> ExportedModel:
  """Reads ``folder/model.json`` and ``folder/model.stablehlo``, checking both (module docstring).

  Raises:
    ExportError (a ValueError): a file is missing or unreadable; ``model.json`` is not a medjax
      export of the version this loader reads, lacks a required key, or was edited since export
      (its `manifest_digest` differs from ``manifest_sha256``); the module lies outside
      ``folder`` or does not match its recorded sha256 (modified or truncated).
  """
  folder = os.path.abspath(folder)
  meta_path = os.path.join(folder, METADATA_FILE)
  metadata = _read_metadata(meta_path)
  module = metadata["module"]
  path = _module_path(folder, meta_path, module["file"])
  if manifest_digest(metadata) != metadata[MANIFEST_KEY]:
    raise ExportError(f"{meta_path}: edited since export (its content does not match its "
                      f"{MANIFEST_KEY}); export the run again rather than editing it")
  got = sha256_file(path)
  if got != module["sha256"]:
    raise ExportError(f"{path}: sha256 {got} does not match {module['sha256']} recorded in "
                      f"{METADATA_FILE}; the file was modified or corrupted since export")
  with open(path, "rb") as f:
    blob = f.read()
  try:
    exported = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # noqa: BLE001 - flatbuffers raises many types on junk
    raise ExportError(f"{path}: not a jax.export module ({type(e).__name__}: {e})") from None
  return ExportedModel(folder, metadata, exported)


def main(argv: list[str] | None = None) -> int:
  """``serving.py FOLDER``: loads the export and prints one JSON line about it (exit 0), or one
  ``error:`` line (exit 2) when it cannot be used."""
  parser = argparse.ArgumentParser(description="Checks a medjax export folder and says what the "
                                   "model takes and returns.")
  parser.add_argument("folder", help="the export folder (model.json + model.stablehlo)")
  args = parser.parse_args(argv)
  try:
    model = load_exported(args.folder)
  except ExportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"folder": model.folder, "task": model.task, "input_shape": model.input_shape,
                    "output_shape": model.output_shape, "class_names": model.class_names,
                    "platforms": list(model.exported.platforms)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
