"""``train_and_evaluate(config, workdir)``: the one training loop for every medjax task.

Sections: workdir → mesh → input → model/optimiser/state → jitted steps → checkpoint restore →
loop (train, log, evaluate, checkpoint) → final report. Only this module, ``launch.py``, the
builders (here and in ``builders.py``) and the checks (``settings.py``) read the ConfigDict;
everything they call takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from medjax import planning
from medjax.data import device as device_data
from medjax.data import pipeline, sources, transforms
from medjax.io.atomic import atomic_write_json
from medjax.train import (
    builders,
    finetune,
    optim,
    preemption,
    report,
    runs,
    settings,
    sharding,
    throughput,
)
from medjax.train.builders import (  # noqa: F401  (build_model, plan_model_defaults: public here)
    build_model,
    build_task,
    harvard_root,
    msd_dataset,
    msd_root,
    plan_model_defaults,
    plan_task_kwargs,
)
from medjax.train.checkpoint import Checkpointer
from medjax.train.divergence import DivergedError, DivergenceRule
from medjax.train.state import TrainState
from medjax.train.steps import (  # noqa: F401  (public here, as before the split)
    evaluate,
    make_bn_recalibration,
    make_eval_step,
    make_train_step,
)
from medjax.train.writers import MetricWriter, read_jsonl


class ConfigMismatchError(ValueError):
  """The workdir belongs to a run with a different config."""

  users_error = True  # one line, exit 2 (medjax.io.errors.is_users_error)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient."""

  users_error = True  # the settings' to fix: one line, exit 2


# ---------------------------------------------------------------------------------------------
# Builders (config → plain objects).
# ---------------------------------------------------------------------------------------------

# The most evaluations (and best-checkpoint saves) a run makes when eval.every_steps is 0.
MAX_EVALS = 24


def resolve_steps(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Total optimiser steps: ``train.steps`` when set, else ``train.epochs`` × steps per epoch but
  at least ``train.min_steps`` (so that a recipe moved to a small dataset still trains enough)."""
  if train_cfg.steps is not None:
    if train_cfg.steps <= 0:
      raise ValueError(f"train.steps must be positive, got {train_cfg.steps}")
    return int(train_cfg.steps)
  if train_cfg.epochs is not None:
    if train_cfg.epochs <= 0:
      raise ValueError(f"train.epochs must be positive, got {train_cfg.epochs}")
    return max(1, int(math.ceil(train_cfg.epochs * steps_per_epoch)),
               int(train_cfg.get("min_steps") or 0))
  raise ValueError("set train.steps or train.epochs")


def itstime(step: int, every: int, total: int) -> bool:
  """True every ``every`` steps and at the last step (``every <= 0``: only the last)."""
  return step == total or (every > 0 and step % every == 0)


@dataclasses.dataclass(frozen=True)
class Data:
  """What the loop needs from ``config.data``, built once by `build_data`."""

  train: Any  # a Grain random-access source of records
  train_transforms: list
  eval: Any
  eval_transforms: list
  num_classes: int
  multi_label: bool = False
  model_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. the plan's
  task_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. the ignore label


def build_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
  """Sources and transforms for ``config.data.source`` (medmnist | msd | harvard)."""
  data_cfg = config.data
  if data_cfg.source == "medmnist":
    kw = dict(size=data_cfg.size, data_dir=data_cfg.dir or None, download=data_cfg.download)
    train, info = sources.medmnist_source(data_cfg.name, data_cfg.train_split, **kw)
    evals, _ = sources.medmnist_source(data_cfg.name, config.eval.split, **kw)
    return Data(train, transforms.parse(data_cfg.train_transforms), evals,
                transforms.parse(data_cfg.eval_transforms), info.info.n_classes,
                info.info.multi_label)
  if data_cfg.source == "msd":
    return _segmentation_data(config, workdir)
  if data_cfg.source == "harvard":  # fusion: two sources in, one fused image (1 channel) out
    root = harvard_root(data_cfg)
    return Data(sources.harvard_source(root, data_cfg.name, data_cfg.train_split),
                transforms.parse(data_cfg.train_transforms),
                sources.harvard_source(root, data_cfg.name, config.eval.split),
                transforms.parse(data_cfg.eval_transforms), 1)
  raise ValueError(f"unknown data.source {data_cfg.source!r} (medmnist | msd | harvard)")


def _segmentation_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
  """MSD-style folder → plan (``workdir/plan.json``) → cache → fold → patch sources.

  Training cuts random patches (a third centred on foreground) and augments them with
  ``data.train_transforms``; evaluation uses one centred patch per val case (3-D) or every slice
  (2-D), scored with the pseudo Dice. The full sliding-window validation runs after training.
  """
  data_cfg = config.data
  # Hold-out cases (data.holdout) are kept out of the plan, the cache and every fold.
  dataset = planning.without_holdout(msd_dataset(data_cfg), data_cfg.get("holdout", ()))
  plan = planning.load_or_make_plan(workdir, dataset, dims=data_cfg.dims,
                                    max_patch_voxels=data_cfg.max_patch_voxels,
                                    overrides=data_cfg.plan.to_dict(),
                                    regions=data_cfg.get("regions") or None)
  cache = planning.prepare_cache(dataset, plan,
                                 data_cfg.cache_dir or os.path.join(workdir, "preprocessed"))
  folds = planning.make_folds([c.case_id for c in dataset.cases],
                              os.path.join(workdir, "splits.json"), folds=data_cfg.folds)
  fold = folds[data_cfg.fold]
  patch = plan["patch_size"]
  if plan["dims"] == 2:
    axis = plan["slice_axis"]
    shape = list(patch)
    shape.insert(axis, 1)
    cut = f"patch(shape={tuple(shape)}, foreground={data_cfg.foreground}, squeeze={axis})"
    evals = planning.SliceSource(cache, fold["val"], axis)
  else:
    cut = f"patch(shape={tuple(patch)}, foreground={data_cfg.foreground})"
    evals = planning.CaseSource(cache, fold["val"], locations=False)
  centre = transforms.CropOrPad(shape=tuple(patch))
  return Data(planning.CaseSource(cache, fold["train"]),
              transforms.parse(cut + "|" + data_cfg.train_transforms), evals, [centre],
              planning.output_channels(plan), model_defaults=plan_model_defaults(plan),
              task_kwargs=plan_task_kwargs(plan))


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict,
                         write: bool = True) -> None:
  """Checks that an existing ``config.json`` matches ``config``, or (``write``) writes it.

  Settings that the saved config lacks are ones medjax gained after the run started: the run
  resumes with their current values, named in one warning, and (``write``) the saved config
  takes them so that the next resume is quiet.

  Raises:
    ConfigMismatchError: the workdir holds another experiment; names the differing keys.
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    added: list[str] = []
    diffs = _dict_diff(saved, current, added=added)
    if diffs:
      raise ConfigMismatchError(
          f"{workdir} holds a run with a different config ({', '.join(diffs[:8])}); use a new "
          "--workdir, or the same config to resume")
    if added and write:
      logging.warning("%s: the run predates settings medjax has gained since; it goes on with "
                      "%s", path, ", ".join(added))
      if jax.process_index() == 0:
        atomic_write_json(path, current, indent=2, sort_keys=True)
  elif write and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    atomic_write_json(path, current, indent=2, sort_keys=True)


def _dict_diff(saved: Any, current: Any, prefix: str = "",
               added: list[str] | None = None) -> list[str]:
  """``"key: saved → current"`` for each differing setting; keys only ``current`` has go to
  ``added`` as ``"key=value"``."""
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current)):
      if k not in saved and added is not None:
        added.append(f"{prefix}{k}={current[k]!r}")
        continue
      out += _dict_diff(saved.get(k, "<missing>"), current.get(k, "<missing>"), f"{prefix}{k}.",
                        added)
    return out
  return [] if saved == current else [f"{prefix[:-1]}: {saved!r} → {current!r}"]


def _pretrained(config: ml_collections.ConfigDict, workdir: str,
                init_state: Callable[[], TrainState]) -> dict[str, Any] | None:
  """The variables ``config.init_from`` gives a run's first start (`finetune.select`), None
  without it or when ``workdir`` holds a checkpoint to resume; checks ``optim.freeze`` too."""
  freeze = tuple(config.optim.get("freeze") or ())
  init_from = config.get("init_from") or ""
  if not (freeze or init_from):
    return None
  abstract = jax.eval_shape(init_state)
  finetune.check_patterns(abstract.params, freeze, "optim.freeze")
  if not init_from or finetune.has_checkpoint(workdir):
    return None
  source, where = finetune.read_source(init_from)
  chosen = finetune.select({"params": abstract.params, "batch_stats": abstract.batch_stats},
                           source, where, tuple(config.get("init_skip") or ()),
                           config.get("init_subtree") or "",
                           config.get("init_from_subtree") or "")
  logging.info("initialising %d of %d parameter arrays from %s", len(chosen["params"]),
               len(jax.tree.leaves(abstract.params)), where)
  return chosen


def _batch_digest(batch: dict[str, Any]) -> str:
  """A digest of a batch's values as the step sees them: host arrays in the dtypes JAX gives
  them (int64 labels are int32 on the device), so a batch placed ahead digests alike."""
  h = hashlib.sha1()
  for k in sorted(batch):
    h.update(k.encode())
    v = np.asarray(batch[k])
    h.update(np.ascontiguousarray(v, jax.dtypes.canonicalize_dtype(v.dtype)).tobytes())
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------

class StoppedEarly(Exception):
  """``on_eval`` asked the run to stop (a search pruned it); its checkpoint of that step is
  saved and it resumes from there if run again."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_eval: Callable[[int, dict[str, float]], bool] | None = None
                       ) -> dict[str, Any]:
  """Trains ``config``'s model in ``workdir``, resuming from its latest checkpoint if any.

  Args:
    config: the experiment.
    workdir: the run folder.
    on_eval: called with ``(step, eval metrics)`` after each evaluation has been checkpointed;
      returning True stops the run there (`StoppedEarly`). A search's member reports its
      evaluations through it (medjax/sweep/search.py), without the loop knowing of searches.

  Returns:
    A summary dict: ``{"steps", "best_step", "best": {metric: value}, "final": {...},
    "train_seconds", "data": "grain" | "device"}`` (``data``: how the train split was fed).
  """
  workdir = os.path.abspath(workdir)
  settings.check(config)

  # Mesh: the global batch is split over every device of every process.
  mesh = sharding.make_mesh(config.mesh.data)
  pcount, pindex = jax.process_count(), jax.process_index()
  for name, bs in (("train.batch_size", config.train.batch_size),
                   ("eval.batch_size", config.eval.batch_size)):
    if bs % mesh.size:
      raise ValueError(f"{name}={bs} is not divisible by the {mesh.size} devices of the mesh")

  # Another experiment's workdir is refused before the data step writes anything there
  # (segmentation: plan.json, splits.json, the preprocessed cache).
  check_workdir_config(workdir, config, write=False)

  # Input.
  data = build_data(config, workdir)
  train_src, eval_src, train_tf, eval_tf = data.train, data.eval, data.train_transforms, \
      data.eval_transforms
  task = build_task(config.task, data.multi_label, label_smoothing=config.train.label_smoothing,
                    **{**data.task_kwargs, **config.get("task_kwargs", {})})
  settings.check_data(config, task, data.num_classes, len(train_src), len(eval_src),
                      getattr(eval_src, "name", ""))
  steps_per_epoch = len(train_src) // config.train.batch_size
  total_steps = resolve_steps(config.train, steps_per_epoch)
  # Default: once per epoch, but no more than about MAX_EVALS times (small datasets, min_steps).
  eval_every = config.eval.every_steps or max(steps_per_epoch, -(-total_steps // MAX_EVALS))
  repl, data_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  on_device = device_data.wanted(config.data.get("on_device", "off"), train_src, train_tf,
                                 jax.default_backend(), sharding.device_memory_bytes())
  if on_device:  # no host iterator: the step gathers its batch (the state's step is the position)
    feed, train_iter = device_data.build(
        train_src, train_tf, batch_size=config.train.batch_size, seed=config.seed,
        steps=total_steps, sharding=repl), None
    logging.info("training split on the device: %.1f MB", feed.nbytes() / 1e6)
  else:
    # One process on an accelerator: batches go to the devices a few steps ahead of the step.
    ahead = (config.data.get("device_prefetch", 0) if jax.default_backend() != "cpu"
             and pcount == 1 else 0)
    feed, train_iter = None, iter(pipeline.train_dataset(
        train_src, train_tf, global_batch_size=config.train.batch_size, seed=config.seed,
        process_index=pindex, process_count=pcount, num_threads=config.data.num_threads,
        prefetch=config.data.prefetch,
        workers=pipeline.resolve_workers(config.data.workers, jax.default_backend()),
        device_sharding=data_sharding if ahead else None, device_prefetch=ahead))

  # Model, optimiser and state, created directly with replicated shardings.
  model = build_model(config.model, data.num_classes, data.model_defaults,
                      builders.run_precision(config))
  tx = optim.make_optimizer(config.optim, total_steps)
  lr_schedule = optim.learning_rate_schedule(config.optim, total_steps)  # for logging only
  first = next(pipeline.eval_batches(eval_src, eval_tf, global_batch_size=1))
  input_shape = first["image"].shape[1:]  # after the transforms, which may crop or resample
  rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))

  def init_state():
    variables = model.init(rng_init, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ema = {"params": params, "batch_stats": batch_stats} if config.train.ema_decay else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=rng_train, ema=ema, apply_fn=model.apply,
                      tx=tx, ema_decay=config.train.ema_decay)

  pretrained = _pretrained(config, workdir, init_state)
  # Only now, with the config, data and source weights known good: a refused run must not leave
  # a config.json that then refuses the corrected command as "another experiment".
  check_workdir_config(workdir, config)
  state = jax.jit(init_state, out_shardings=repl)()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("model %s: %.2fM parameters, input %s, %d devices on %d processes",
               config.model.name, num_params / 1e6, input_shape, mesh.size, pcount)

  step_fn = make_train_step(task, config.train.mixup, config.train.modality_dropout)
  if feed is None:
    train_step = jax.jit(step_fn, in_shardings=(repl, data_sharding),
                         out_shardings=(repl, repl), donate_argnums=0)
  else:
    train_step = jax.jit(
        lambda state, arrays, indices: step_fn(state, jax.lax.with_sharding_constraint(
            feed.batch(arrays, indices, state.step), data_sharding)),
        in_shardings=(repl, repl, repl), out_shardings=(repl, repl), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(task, tuple(config.eval.flip_axes)),
                      in_shardings=(repl, data_sharding),
                      out_shardings=repl)
  recalibrate = None
  if config.train.bn_recalibration_batches:
    recalibrate = make_bn_recalibration(model.apply, train_src, eval_tf, config, mesh)

  # Restore: the newest intact checkpoint; broken newer ones are moved aside, a line each.
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                      best_metric=config.eval.best_metric)
  state, start_step = ckpt.restore_latest(state, train_iter)
  if start_step:
    ckpt.check_best()
    logging.info("resumed from step %d", start_step)
  elif pretrained is not None:
    state = finetune.start_from(state, pretrained, repl)
  writer = MetricWriter(workdir, resume_step=start_step)
  record_path = os.path.join(workdir, "batches.jsonl")

  # Loop. SIGTERM (preemption) stops it at the next step boundary, after a checkpoint.
  last_metrics: dict[str, float] = {}
  t0 = time.perf_counter()
  meter = throughput.Throughput(
      config.train.batch_size,
      math.prod(input_shape[:-1]) if task.name == "segmentation" else 0,
      throughput.device_peak(mesh, builders.run_precision(config)))
  flops_pending = meter.peak is not None  # MFU: the step's FLOPs, once, on GPUs and TPUs
  diverged = DivergenceRule(config.train.divergence_factor, config.train.divergence_window,
                            config.train.divergence_patience)
  bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                  disable=pindex != 0, dynamic_ncols=True)
  with preemption.StopOnSignal() as stop:
    for step in range(start_step + 1, total_steps + 1):
      if feed is None:
        t_wait = time.perf_counter()
        batch = next(train_iter)
        meter.waited(time.perf_counter() - t_wait)
        if config.train.record_batches and pindex == 0:
          with open(record_path, "a") as f:
            f.write(json.dumps({"step": step, "digest": _batch_digest(batch)}) + "\n")
        args = (state, batch if ahead else sharding.to_global(batch, mesh))
      else:  # the step gathers its batch on the device: no input to wait for
        args = (state, feed.arrays, feed.indices)
      if flops_pending:  # a compilation of its own, left out of step time
        flops_pending, t_flops = False, time.perf_counter()
        per_device = throughput.step_flops(train_step, *args)
        meter.flops_per_step = per_device * mesh.size if per_device else None
        meter.exclude(time.perf_counter() - t_flops)
      state, out = train_step(*args)
      del args  # holds the donated state
      out = jax.device_get(out)
      loss = float(out["loss"])
      if not bool(out["finite"]):
        bar.close()
        last_good = ckpt.latest_step()
        raise NonFiniteLossError(
            f"step {step}: loss is {loss} or a gradient is not finite; stopped without saving. "
            f"Last good checkpoint: step {last_good} in {os.path.join(workdir, 'checkpoints')}")
      why = diverged.update(step, loss)
      if why:
        bar.close()
        # The loss of step t is that of the weights saved at step t - 1.
        before = [s for s in ckpt.all_steps() if s < diverged.first_high_step - 1]
        raise DivergedError(
            f"step {step}: {why}; stopped (train.divergence_factor=0 turns this rule off). Last "
            f"good checkpoint: step {max(before) if before else None} in "
            f"{os.path.join(workdir, 'checkpoints')}")
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      meter.stepped()
      if itstime(step, config.train.log_every_steps, total_steps):
        writer.write(step, {"train/loss": loss, **meter.metrics(),
                            "train/lr": float(lr_schedule(step - 1)),
                            "train/epoch": step / steps_per_epoch})
      t_other = time.perf_counter()  # evaluation and checkpoints: not step time
      eval_now = itstime(step, eval_every, total_steps)
      if eval_now:
        if recalibrate is not None:
          state = recalibrate(state)
        last_metrics, _, _ = evaluate(state, eval_step, eval_src, eval_tf,
                                      config.eval.batch_size, mesh, task)
        writer.write(step, {f"{config.eval.split}/{k}": v for k, v in last_metrics.items()})
        if pindex == 0:  # tqdm.write prints even when the bar is disabled
          bar.write(f"step {step}: " + " ".join(f"{config.eval.split}_{k}={v:.4f}"
                                                for k, v in last_metrics.items()))
      # No checkpoint while the loss is far above its median (a divergence may be starting):
      # the last one before stays the newest, and keep_checkpoints never evicts it for it.
      saved = ((eval_now or itstime(step, config.train.checkpoint_every_steps, total_steps))
               and (diverged.first_high_step is None or step == total_steps))
      if saved:
        metric = last_metrics.get(config.eval.best_metric) if eval_now else None
        ok_metric = metric is not None and math.isfinite(metric)
        ckpt.save(step, state, train_iter, metrics=last_metrics if ok_metric else None)
      meter.exclude(time.perf_counter() - t_other)
      # Stopped early, by a search's pruner (on_eval) or a signal: this step's checkpoint is kept
      # (saved now if the divergence rule held it back).
      pruned = (eval_now and on_eval is not None and step < total_steps
                and on_eval(step, last_metrics))
      signalled = step < total_steps and stop.requested(pcount)
      if pruned or signalled:
        if not saved:
          ckpt.save(step, state, train_iter)
        bar.close()
        if train_iter is not None:
          train_iter.close()
        writer.close()
        ckpt.close()
        where = os.path.join(workdir, "checkpoints")
        if pruned:
          raise StoppedEarly(f"stopped after the evaluation of step {step} of {total_steps}; "
                             f"checkpoint saved in {where}")
        raise preemption.Preempted(f"stopped by a signal after step {step} of {total_steps}; "
                                   f"checkpoint saved in {where}: run the same command to resume")
  bar.close()
  if train_iter is not None:
    train_iter.close()  # stops Grain's prefetch threads and worker processes
  train_seconds = time.perf_counter() - t0
  writer.write(total_steps, {"time/train_seconds": train_seconds})
  writer.close()

  # Report: the best checkpoint (chosen on the eval split) is re-evaluated for the ROC plot.
  best_step = ckpt.best_step() or total_steps
  if best_step != total_steps:
    state = ckpt.restore(best_step, state)
  best_metrics, labels, preds = evaluate(state, eval_step, eval_src, eval_tf,
                                         config.eval.batch_size, mesh, task)
  ckpt.close()
  summary = {"experiment": f"{config.data.name} / {config.model.name}",
             "split": config.eval.split, "steps": total_steps, "best_step": best_step,
             "best": best_metrics, "final": last_metrics, "train_seconds": train_seconds,
             "data": "device" if feed is not None else "grain", "workdir": workdir}
  if pindex == 0:
    history = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if task.name in ("segmentation", "fusion"):  # images, no ROC (segmentation: launch.py
      # adds the full validation)
      report.write_report(workdir, summary, history)
    else:
      report.write_report(workdir, summary, history, labels, preds)
    runs.mark_finished(workdir, summary)  # last: the sweep counts the run finished from here
  return summary
