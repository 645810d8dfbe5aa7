"""Loads a model exported by ``medjax.infer.export`` and runs it, with only jax and numpy.

Serving must not need the training stack, so this module imports nothing from medjax or flax:
copy it next to an export folder (``model.stablehlo`` + ``model.json``) and it runs anywhere jax
does (plus ``flatbuffers``, which jax needs to deserialise a module).

  model = load_exported("model/")
  probs = model(model.preprocess(raw_uint8_images))   # float32 [N, K]

`preprocess` replays the run's recorded MedMNIST evaluation transforms in numpy, with the same
float32 arithmetic as ``medjax.data.transforms``. Segmentation exports take preprocessed patches;
their preprocessing (crop, normalise, resample) and the whole-volume sliding window stay with the
caller, as ``model.json`` describes.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import numpy as np

FORMAT = "medjax.export"
# Bumped when model.json changes in a way an older loader would misread.
FORMAT_VERSION = 1
MODULE_FILE = "model.stablehlo"
METADATA_FILE = "model.json"


def sha256_file(path: str) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


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


def load_exported(folder: str) -> ExportedModel:
  """Reads ``folder/model.json`` and ``folder/model.stablehlo``, checking the module's sha256.

  Raises:
    FileNotFoundError: either file is missing.
    ValueError: ``model.json`` is not a medjax export of a version this loader reads, or
      ``model.stablehlo`` does not match its recorded sha256 (modified or truncated).
  """
  folder = os.path.abspath(folder)
  meta_path = os.path.join(folder, METADATA_FILE)
  with open(meta_path) as f:
    metadata = json.load(f)
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: not a medjax export (format {metadata.get('format')!r})")
  if metadata.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{meta_path}: format version {metadata['format_version']} is newer than "
                     f"this loader's {FORMAT_VERSION}; use the serving.py that came with it")
  module = metadata["module"]
  path = os.path.join(folder, module["file"])
  got = sha256_file(path)
  if got != module["sha256"]:
    raise ValueError(f"{path}: sha256 {got} does not match {module['sha256']} recorded in "
                     f"{METADATA_FILE}; the file was modified or corrupted since export")
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return ExportedModel(folder, metadata, exported)
