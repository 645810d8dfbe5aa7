"""The base config every experiment starts from; each field is documented where it is set.

Experiments import ``get_base_config()`` and override what differs, so every default lives here.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # initialisation, dropout and data order all derive from it.
  c.task = "classification"  # a name in medjax.train.tasks.

  c.data = ml_collections.ConfigDict()
  c.data.source = "medmnist"  # a name in medjax.train.loop's source builders.
  c.data.name = ""  # e.g. "pneumoniamnist".
  c.data.size = 28  # MedMNIST image size (28, 64, 128, 224).
  c.data.dir = ""  # empty: $MEDJAX_DATA_DIR/medmnist.
  c.data.download = False  # fetch the official file (md5-checked) when it is absent.
  c.data.train_split = "train"
  c.data.train_transforms = "to_float|normalize(0.5, 0.5)"
  c.data.eval_transforms = "to_float|normalize(0.5, 0.5)"
  # Segmentation (data.source = "msd"): an MSD/nnU-Net folder under data.dir or
  # $MEDJAX_DATA_DIR/<data.name>, planned like nnU-Net (workdir/plan.json).
  c.data.dims = 3  # 3: volumetric patches; 2: slices along the plan's slice axis.
  c.data.max_patch_voxels = 40 * 56 * 40  # the planner's patch budget (3-D voxels).
  c.data.plan = ml_collections.ConfigDict()  # overrides of plan keys, e.g. patch_size.
  c.data.cache_dir = ""  # preprocessed cases; empty: workdir/preprocessed.
  c.data.channels = ()  # names of the input channels to read (a subset); (): all the dataset's.
  c.data.folds = 5
  c.data.fold = 0  # validation fold (splits.json in the workdir, written once).
  # Case ids kept out of the plan and every fold: a test set for ensembles and post-processing.
  c.data.holdout = ()
  # Region-based training (nnU-Net's regions): overlapping label groups, outermost first, one
  # sigmoid output each, e.g. ("whole_tumour=1,2,3", "core=2,3", "enhancing=3"); (): one
  # softmax output per label value (medjax/planning/regions.py).
  c.data.regions = ()
  c.data.foreground = 0.33  # share of training patches centred on a foreground voxel.
  c.data.num_threads = 4  # Grain read threads per process.
  c.data.prefetch = 16  # records buffered ahead per process.
  # Grain worker processes preparing train batches; -1: none on CPU (its cores run the model),
  # else half the cores up to 8 (a GPU outruns one interpreter's per-record transforms).
  c.data.workers = -1
  # Keep the training split in accelerator memory and gather + augment each batch inside the
  # step (medjax/data/device.py): "auto" (an accelerator, a split that fits, ops that can),
  # "on" or "off" (the Grain pipeline).
  c.data.on_device = "auto"
  # Otherwise, with one process on an accelerator: batches moved to the devices this many steps
  # ahead of the step that reads them (grain.experimental.device_put). 0: when the step asks.
  c.data.device_prefetch = 2

  # Fine-tuning (medjax/train/finetune.py): start from another run's weights, a run folder (its
  # best checkpoint, else its latest) or one checkpoint folder (<run>/checkpoints/<step>). Only
  # the first start reads it; a resumed run restores its own checkpoint.
  c.init_from = ""
  c.init_skip = ()  # regexes over '/'-joined paths kept freshly initialised, e.g. "^head", "Dense"
  c.init_subtree = ""  # the part of the model to load, e.g. "encoder"; "": the whole model
  c.init_from_subtree = ""  # the part of the source it comes from; "": the source's root

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"  # a name in the models registry.
  # Module fields (see the model's docstring); the ResNet default stem is 3×3/1 without pooling.
  c.model.kwargs = ml_collections.ConfigDict({"dropout": 0.0})

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global batch, split over processes and devices.
  # Duration: exactly one of steps / epochs is set (the other None).
  c.train.steps = ml_collections.FieldReference(None, field_type=int)
  c.train.epochs = ml_collections.FieldReference(None, field_type=float)
  # With train.epochs: at least this many steps, so a recipe moved to a smaller dataset still
  # trains enough (MedMNIST's protocol trains 100 epochs whatever the size).
  c.train.min_steps = 0
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 0  # 0: checkpoint at each evaluation only.
  c.train.keep_checkpoints = 2  # the last k, plus the best by eval.best_metric.
  c.train.record_batches = False  # write a digest of every batch to batches.jsonl (resume tests).
  # "bf16": activations and convolutions in bfloat16 (GPUs, TPUs); parameters, optimiser state,
  # checkpoints, losses, norms' statistics and metrics stay float32. "float32": everything.
  c.train.precision = "float32"
  c.train.label_smoothing = 0.0
  c.train.mixup = 0.0  # > 0: mixup's Beta(α, α) (classification; loop.make_train_step).
  # > 0: each training image loses one input channel (modality, zeroed) with this probability,
  # never all; such a run may predict with a modality missing (predict --fill_missing_channels).
  c.train.modality_dropout = 0.0
  c.train.ema_decay = 0.0  # > 0: evaluate (and select checkpoints on) an EMA of the weights.
  # > 0: before each evaluation, recompute BatchNorm statistics on this many eval-size batches of
  # training images under the eval transforms (medjax/train/batch_norm.py: "precise BN").
  c.train.bn_recalibration_batches = 0
  # A divergence that stays finite (NaN/Inf always stop the run): stop when the training loss
  # stays above divergence_factor × the median of its last divergence_window losses for
  # divergence_patience consecutive steps (medjax/train/divergence.py). 0: off.
  c.train.divergence_factor = 10.0
  c.train.divergence_window = 50
  c.train.divergence_patience = 5

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # adamw | sgd
  c.optim.lr = 1e-3  # peak learning rate.
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9  # sgd only.
  c.optim.warmup_fraction = 0.05  # of total steps, linear from 0.
  c.optim.end_lr_factor = 0.0  # cosine decays to lr * this.
  c.optim.grad_clip_norm = 0.0  # 0: no clipping.
  # Regexes over '/'-joined parameter paths (re.search, e.g. "^enc"): those parameters are not
  # trained (fine-tuning; their BatchNorm statistics still follow the batches).
  c.optim.freeze = ()

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "val"  # never select models on test; `test` evaluates a file that has one.
  c.eval.every_steps = 0  # 0: once per epoch, at most loop.MAX_EVALS times a run.
  c.eval.batch_size = 256
  c.eval.best_metric = "auc"  # checkpoint retained as best; higher is better.
  c.eval.mirror = True  # segmentation: mirroring test-time augmentation in the final validation.
  # Classification: spatial axes (as the flip transform's) whose flips are averaged into every
  # evaluated prediction, test-time augmentation (medjax/train/tta.py); (): none.
  c.eval.flip_axes = ()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the batch axis; -1: all.
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long smoke run (``--config=configs/x.py:runlocal``)."""
  c.train.steps = 4
  c.train.epochs = None
  c.train.batch_size = 16
  c.train.log_every_steps = 1
  c.eval.every_steps = 2
  c.eval.batch_size = 64
  c.model.name = "resnet_tiny"
  return c


def parse_variants(arg: str | None, known: tuple[str, ...]) -> set[str]:
  """The comma-separated variants in a config's ``:arg`` (``"64,runlocal"``).

  Raises:
    ValueError: a variant not in ``known``, named with the known ones.
  """
  args = {a.strip() for a in (arg or "").split(",") if a.strip()}
  if args - set(known):
    raise ValueError(f"unknown config variant(s) {sorted(args - set(known))}; "
                     f"known: {', '.join(known)}")
  return args
