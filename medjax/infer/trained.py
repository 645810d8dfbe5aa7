"""A finished run loaded back from its workdir: config, model, best weights, batched prediction.

Evaluation, prediction on new studies, feature export and serving export all start here, so none
of them re-types the preprocessing or the network: both come from the run's ``config.json`` (and
``plan.json`` for segmentation), the weights from its best checkpoint (the EMA when it kept one).

Embeddings: models ``sow`` their pooled pre-head features as ``intermediates/embedding`` (ResNet,
the slice-sequence models; the U-Net its pooled bottleneck), so one mechanism serves them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from medjax.data import pipeline, sources, transforms
from medjax.io.errors import MedjaxIOError
from medjax.train import builders, tasks, tta
from medjax.train.checkpoint import load_variables


def _read_json(path: str,
               missing: str = "missing: is this the workdir of a finished medjax run?"
               ) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise MedjaxIOError(path, missing) from None
  except json.JSONDecodeError as e:
    raise MedjaxIOError(path, f"not valid JSON ({e})") from None


def read_run_config(workdir: str) -> dict[str, Any]:
  """A finished run's ``config.json`` as a dict; a `MedjaxIOError` naming it when it is missing
  or broken."""
  return _read_json(os.path.join(workdir, "config.json"))


def read_run_plan(workdir: str) -> dict[str, Any]:
  """A segmentation run's ``plan.json``; a `MedjaxIOError` naming it when missing or broken."""
  return _read_json(os.path.join(workdir, "plan.json"), "missing: not a segmentation run")


# Sowed intermediates that prediction returns beside the probabilities, where a model has them.
SOWN = ("embedding", "slice_attention")


def find_sown(tree: Any, name: str) -> jax.Array | None:
  """The outermost sowed ``name`` in an ``intermediates`` collection (sow stores tuples)."""
  if isinstance(tree, dict):
    if name in tree:
      value = tree[name]
      return value[-1] if isinstance(value, tuple) else value
    for v in tree.values():
      found = find_sown(v, name)
      if found is not None:
        return found
  return None


@dataclasses.dataclass
class TrainedModel:
  """A trained model with everything needed to feed it.

  Attributes:
    workdir: the run folder.
    config: the run's config (``config.json``).
    model: the linen module, built as the loop built it.
    variables: ``{"params", "batch_stats"}`` of checkpoint ``step``.
    step: the checkpoint step loaded (the best on validation unless asked otherwise).
    task: the loop's task (its ``predict_fn`` turns outputs into probabilities).
    num_classes: classes (or label columns for multi-label data).
    class_names: names by class index.
    plan: the segmentation plan (``plan.json``), or None.
    precision: the compute precision the model runs in (`builders.PRECISIONS`): the run's
      ``train.precision`` unless `load` was asked for another.
  """

  workdir: str
  config: ml_collections.ConfigDict
  model: nn.Module
  variables: dict[str, Any]
  step: int
  task: tasks.Task
  num_classes: int
  class_names: tuple[str, ...]
  plan: dict[str, Any] | None = None
  precision: str = "float32"

  @classmethod
  def load(cls, workdir: str, step: int | None = None,
           precision: str | None = None) -> TrainedModel:
    """Loads ``workdir``'s run at checkpoint ``step`` (default: best on validation, else latest),
    computing in ``precision`` (default: the run's ``train.precision``; the weights are float32
    either way, so ``"float32"`` runs a bf16-trained model in float32).

    Raises:
      MedjaxIOError: the workdir lacks ``config.json`` / ``plan.json`` or any checkpoint.
    """
    workdir = os.path.abspath(workdir)
    config = ml_collections.ConfigDict(read_run_config(workdir))
    plan, defaults = None, {}
    if config.data.source == "msd":
      plan = read_run_plan(workdir)
      defaults = builders.plan_model_defaults(plan)
    num_classes, class_names, multi_label = builders.label_space(config, plan)
    precision = precision or builders.run_precision(config)
    if precision not in builders.PRECISIONS:
      raise ValueError(f"precision={precision!r} is not a precision; known: "
                       f"{', '.join(builders.PRECISIONS)}")
    model = builders.build_model(config.model, num_classes, defaults, precision)
    variables, step = load_variables(os.path.join(workdir, "checkpoints"),
                                     config.eval.best_metric, step)
    return cls(workdir, config, model, jax.device_put(variables, jax.local_devices()[0]), step,
               builders.build_task(config.task, multi_label, **builders.plan_task_kwargs(plan)),
               num_classes, class_names, plan,
               precision)

  # --- Data -----------------------------------------------------------------------------------

  def eval_transforms(self) -> list:
    """The run's evaluation preprocessing, parsed from its config."""
    return transforms.parse(self.config.data.eval_transforms)

  def source(self, split: str):
    """The run's dataset split (``train``, ``val``, ``test``) as a Grain source (classification)."""
    data = self.config.data
    if data.source != "medmnist":
      raise ValueError(f"{self.workdir}: split sources exist for MedMNIST runs; this run's data "
                       f"is {data.source!r} (use medjax.infer.segment for segmentation)")
    src, _ = sources.medmnist_source(data.name, split, size=data.size,
                                     data_dir=data.dir or None, download=False)
    return src

  # --- Prediction -----------------------------------------------------------------------------

  def forward_logits(self, images: jax.Array) -> jax.Array:
    """``images [B, ...] -> outputs [B, ...]`` (the full-resolution head's, float32), unjitted."""
    outputs = self.model.apply(self.variables, images, train=False)
    if isinstance(outputs, (list, tuple)):  # deep-supervision heads: the full-size one
      outputs = outputs[0]
    return outputs.astype(jnp.float32)

  def forward(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``images [B, ...] -> (probabilities [B, K], {name: sowed array})``, unjitted, for the
    names in ``SOWN`` the model sows (``embedding [B, F]``, ``slice_attention [B, T]``).

    Probabilities are averaged over the run's ``eval.flip_axes`` flips, as its evaluation was;
    the sowed arrays are the plain images'."""
    outputs, state = self.model.apply(self.variables, images, train=False,
                                      mutable=["intermediates"])
    if isinstance(outputs, (list, tuple)):
      outputs = outputs[0]
    intermediates = state.get("intermediates", {})
    sown = {name: find_sown(intermediates, name) for name in SOWN}
    probs = self.task.predict_fn(outputs).astype(jnp.float32)
    # The flips the training loop's evaluation averaged over (runs saved before: none).
    flip_axes = tuple(self.config.eval.get("flip_axes", ()))
    if flip_axes:
      probs = tta.flip_averaged(lambda x: self.task.predict_fn(self.forward_logits(x)), images,
                                flip_axes, plain=probs)
    return probs, {k: v for k, v in sown.items() if v is not None}

  @functools.cached_property
  def logits(self):
    """`forward_logits`, jitted."""
    return jax.jit(self.forward_logits)

  @functools.cached_property
  def apply(self):
    """`forward`, jitted."""
    return jax.jit(self.forward)

  def predict(self, source, batch_size: int | None = None,
              progress: bool = True) -> dict[str, np.ndarray]:
    """Probabilities (and sowed embeddings / slice attention) for every record of ``source``.

    Returns:
      ``{"index" [N], "label" [N] or [N, K], "probs" [N, K](, "embedding" [N, F],
      "slice_attention" [N, T])}`` in the
      source's order; ``index`` is each record's position in its split.
    """
    batch_size = batch_size or self.config.eval.batch_size
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("index", "label", "probs", *SOWN)}
    batches = pipeline.eval_batches(source, self.eval_transforms(), global_batch_size=batch_size)
    total = -(-len(source) // batch_size)
    for batch in tqdm.tqdm(batches, total=total, desc="predict", unit="batch",
                           disable=not progress, dynamic_ncols=True):
      probs, sown = jax.device_get(self.apply(jnp.asarray(batch["image"], jnp.float32)))
      keep = np.asarray(batch["mask"]) > 0
      out["index"].append(np.asarray(batch["index"])[keep])
      out["label"].append(np.asarray(batch["label"])[keep])
      out["probs"].append(np.asarray(probs)[keep])
      for name, value in sown.items():
        out[name].append(np.asarray(value)[keep])
    return {k: np.concatenate(v) for k, v in out.items() if v}

  def predict_images(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Probabilities ``[N, K]`` of already-preprocessed ``images [N, ...]``, in fixed-size batches
    (the last padded) so that the network compiles once."""
    batch_size = batch_size or self.config.eval.batch_size
    probs = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      p, _ = self.apply(jnp.asarray(chunk, jnp.float32))
      probs.append(np.asarray(p)[:batch_size - pad])
    return np.concatenate(probs)

