"""Segmentation data, nnU-Net style: fingerprint → plan → preprocessed cache → folds → patches.

``plan``: `fingerprint`, `make_plan`, `load_or_make_plan`. ``preprocessing``: `preprocess`,
`restore_geometry`, the cache (`prepare_cache`, `load_cached`). ``folds``: `make_folds`, the hold-out
(`hash_holdout`, `without_holdout`).
``patches``: the cached-case sources and the ``patch`` transform (registered on import).
``regions``: region-based training's declarations, outputs and label maps (`label_map`).
"""

from medjax.planning.folds import hash_holdout, make_folds, without_holdout  # noqa: F401
from medjax.planning.patches import CaseSource, RandomPatch, SliceSource  # noqa: F401
from medjax.planning.plan import fingerprint, load_or_make_plan, make_plan  # noqa: F401
from medjax.planning.preprocessing import (  # noqa: F401
  CachedCase,
  load_cached,
  plan_hash,
  prepare_cache,
  preprocess,
  restore_geometry,
)
from medjax.planning.regions import (  # noqa: F401
  label_map,
  output_channels,
  output_names,
  plan_regions,
  scored_classes,
  scored_names,
)
