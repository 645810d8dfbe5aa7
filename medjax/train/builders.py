"""Config → objects, shared by the training loop and `medjax.infer.trained.TrainedModel`.

A finished run is loaded back with the very functions that built it for training: the model
(the registry's, with the plan's widths as defaults), the task (the data decides multi-label),
the label space and the dataset folder. Neither side re-types them.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from medjax import models, planning, registry  # noqa: F401  (models: registers the zoo)
from medjax.io import medmnist, msd
from medjax.train import tasks


def msd_root(data_cfg: ml_collections.ConfigDict) -> str:
  """The dataset folder: ``data.dir``, else ``$MEDJAX_DATA_DIR/<data.name>``."""
  return data_cfg.dir or os.path.join(os.environ.get("MEDJAX_DATA_DIR", ""), data_cfg.name)


def msd_dataset(data_cfg: ml_collections.ConfigDict) -> msd.MSDDataset:
  """The dataset at `msd_root`, reading only ``data.channels`` when set (a subset of its
  modalities, e.g. ``("FLAIR",)`` for a single-modality run; the plan records them).

  Raises:
    ValueError: a ``data.channels`` name the dataset has not (`msd.select_channels`).
  """
  return msd.select_channels(msd.read_msd_dataset(msd_root(data_cfg)),
                             data_cfg.get("channels") or ())


def harvard_root(data_cfg: ml_collections.ConfigDict) -> str:
  """The Harvard atlas folder: ``data.dir``, else ``$MEDJAX_DATA_DIR/fusion/harvard_aanlib``."""
  return data_cfg.dir or os.path.join(os.environ.get("MEDJAX_DATA_DIR", ""), "fusion",
                                      "harvard_aanlib")


def plan_model_defaults(plan: dict[str, Any]) -> dict[str, Any]:
  """The U-Net fields a plan decides (config ``model.kwargs`` may still override them)."""
  return {"features": plan["features"], "strides": plan["strides"]}


# ``train.precision`` → the models' compute dtype (Flax's ``dtype``). Parameters, optimiser state
# and checkpoints stay float32 whatever it is; the models keep losses' inputs (logits), norms'
# statistics and pooled features in float32.
PRECISIONS = {"float32": jnp.float32, "bf16": jnp.bfloat16}


def run_precision(config: ml_collections.ConfigDict) -> str:
  """A run's ``train.precision``; ``"float32"`` for runs saved before the setting existed."""
  return config.train.get("precision", "float32")


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int,
                defaults: dict[str, Any] | None = None, precision: str = "float32") -> nn.Module:
  """The registry's model, with ``defaults`` (e.g. the plan's widths) under the config's kwargs,
  computing in ``precision`` (a `PRECISIONS` key; ``"float32"`` leaves the model's default)."""
  kwargs = {**(defaults or {}), **model_cfg.kwargs.to_dict()}
  if precision != "float32":
    kwargs["dtype"] = PRECISIONS[precision]
  return registry.lookup(model_cfg.name, "models.")(num_classes=num_classes, **kwargs)


def task_name(name: str, multi_label: bool) -> str:
  """``config.task``, except that multi-label data makes ``classification`` one sigmoid per
  label (``multilabel_classification``): the data decides, not the config."""
  return "multilabel_classification" if multi_label and name == "classification" else name


def build_task(name: str, multi_label: bool = False, **kwargs) -> tasks.Task:
  """The registry's task for ``config.task`` on data that is (or is not) multi-label."""
  return tasks.get_task(task_name(name, multi_label), **kwargs)


def plan_task_kwargs(plan: dict[str, Any] | None) -> dict[str, Any]:
  """The segmentation task's settings a plan decides: the ignore label and the regions."""
  if plan is None:
    return {}
  return {"ignore_label": plan.get("ignore_label"), "regions": planning.plan_regions(plan)}


def label_space(config: ml_collections.ConfigDict, plan: dict[str, Any] | None = None
                ) -> tuple[int, tuple[str, ...], bool]:
  """``(num_classes, class_names, multi_label)`` of a run's model outputs: the plan's for
  segmentation (MSD) runs (its regions where it has them), one fused channel for fusion runs,
  the MedMNIST set's otherwise."""
  if config.data.source == "harvard":  # fusion: one output channel, the fused image
    return 1, ("fused",), False
  if config.data.source == "msd":
    if plan is None:
      raise ValueError("a segmentation run's label space comes from its plan")
    return planning.output_channels(plan), planning.output_names(plan), False
  info = medmnist.get_info(config.data.name, config.data.size)
  return info.n_classes, tuple(info.label_names), info.multi_label
