"""Segmentation metrics (Dice, IoU, HD95, MSD): `medjax.metrics.segmentation` under its old
address."""

from medjax.metrics.segmentation import (  # noqa: F401
    METRICS,
    Class,
    SegmentationSummary,
    bootstrap_means,
    dice,
    format_table,
    hd95,
    image_diagonal,
    iou,
    mean_surface_distance,
    plot_dice_boxes,
    segmentation_metrics,
    summarize,
    surface_distances,
)
