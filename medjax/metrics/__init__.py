"""Metrics on host arrays, below training: what checkpoints are selected with and reports cite.

``selection``: the loop's per-task metrics. ``classification``, ``calibration``, ``bootstrap``,
``classification_report``, ``plots``: the classification report's pieces. ``segmentation``:
per-case Dice/IoU/HD95/MSD and their summaries.
"""
