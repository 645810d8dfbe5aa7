"""Metrics, result tables and plots."""
