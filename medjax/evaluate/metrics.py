"""The metrics the training loop selects checkpoints with: `medjax.metrics.selection` under its old
address."""

from medjax.metrics.selection import (  # noqa: F401
    classification_metrics,
    multilabel_metrics,
    pseudo_dice,
)
