"""Metrics, result tables and plots.

``metrics``: what the training loop selects checkpoints with. ``classification``: the
classification report (bootstrap intervals, calibration, tables, plots). ``segmentation``:
per-case Dice/IoU/HD95/MSD and their summaries. ``report``: a training run's ``results.md``.
"""
