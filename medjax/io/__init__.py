"""Readers for medical image files; every failure is a MedjaxIOError naming the file and cause."""

from __future__ import annotations

from medjax.io.errors import MedjaxIOError
from medjax.io.medmnist import INFO as MEDMNIST_INFO
from medjax.io.medmnist import MedMNISTInfo, MedMNISTSplit, download_medmnist, load_medmnist

__all__ = [
    "MEDMNIST_INFO",
    "MedMNISTInfo",
    "MedMNISTSplit",
    "MedjaxIOError",
    "download_medmnist",
    "load_medmnist",
]
