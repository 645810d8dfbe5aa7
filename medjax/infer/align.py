r"""Separate series onto one grid on the command line: a multi-channel NIfTI, and an overlay figure.

  python -m medjax.infer.align --reference=T1post/ --moving=FLAIR/ --moving=T2/ \
      --labels=Mask/ --out=aligned.nii.gz [--out_labels=mask.nii.gz] [--figure=overlay.png]

Each ``--moving`` image (a DICOM series folder or file, or NIfTI) is resampled onto the grid of
``--reference`` from the stored geometry alone (`medjax.io.align`): linear for images, nearest
neighbour for ``--labels``. ``--out`` gets the reference then each moving image as channels;
``--out_labels`` the label maps; ``--figure`` one PNG with the label map's outline on each channel,
in the slice through the middle of the labelled region (the middle slice without labels).

Series on different DICOM frames of reference (unless ``--assume_registered``), or that overlap
the reference by less than ``--min_overlap`` of the smaller field of view, and any unreadable
input stop the run with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from medjax.io import align, write_nifti
from medjax.io.atomic import atomic_path
from medjax.io.errors import EXIT_USERS_ERROR, exit_on_users_error
from medjax.io.volume import Volume

EXIT_OK, EXIT_ERROR = 0, EXIT_USERS_ERROR
_PANEL_INCHES, _DPI = 3.0, 100


def middle_slice(labels: Volume | None, depth: int) -> int:
  """The slice (third axis) through the centre of the labelled voxels, or the middle one."""
  if labels is None or not np.any(labels.array):
    return depth // 2
  k = np.nonzero(np.any(labels.array != 0, axis=(0, 1, 3)))[0]
  weights = np.count_nonzero(labels.array != 0, axis=(0, 1, 3))[k]
  return int(round(float(np.average(k, weights=weights))))


def overlay_figure(images: Volume, labels: Volume | None, names: Sequence[str]) -> Figure:
  """One panel per image channel: the slice of `middle_slice` as a viewer shows it (rows down),
  windowed to its 1st–99.5th percentile, with the label map's outline in red."""
  k = middle_slice(labels, images.shape[2])
  aspect = images.spacing[1] / images.spacing[0]  # row height over column width
  height = _PANEL_INCHES * aspect * images.shape[1] / images.shape[0] + 0.35  # + the titles
  fig = Figure(figsize=(_PANEL_INCHES * images.channels, height))
  FigureCanvasAgg(fig)
  for c in range(images.channels):
    ax = fig.add_subplot(1, images.channels, c + 1)
    plane = images.array[:, :, k, c].T.astype(np.float32)
    low, high = np.percentile(plane, [1, 99.5])
    ax.imshow(plane, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect,
              interpolation="nearest")
    if labels is not None:
      for m in range(labels.channels):
        mask = labels.array[:, :, k, m].T != 0
        if mask.any():
          ax.contour(mask.astype(np.float32), levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(f"{names[c]} (slice {k})", fontsize=9)
    ax.set_axis_off()
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / height, wspace=0.03)
  return fig


def save_figure(fig: Figure, path: str) -> None:
  """Writes ``fig`` as a palette PNG (a few hundred KB at most for grey panels), atomically."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=_DPI)
  image = Image.open(buffer).convert("RGB").quantize(
      128, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path, suffix=".png") as tmp:
    image.save(tmp, optimize=True)


def _short(path: str) -> str:
  return os.path.basename(os.path.normpath(path))


def run(reference: str, moving: Sequence[str], labels: Sequence[str], out: str,
        out_labels: str | None = None, figure: str | None = None,
        assume_registered: bool = False, min_overlap: float = align.MIN_OVERLAP) -> Volume:
  """Aligns, writes ``out`` (and ``out_labels``, ``figure``); returns the stacked images."""
  if out_labels and not labels:
    raise ValueError("--out_labels needs --labels")
  images, masks = align.read_aligned(reference, moving, labels,
                                     assume_registered=assume_registered,
                                     min_overlap=min_overlap)
  write_nifti(images, out)
  if out_labels:
    write_nifti(masks, out_labels)
  if figure:
    save_figure(overlay_figure(images, masks, [_short(p) for p in (reference, *moving)]), figure)
  return images


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("reference", None, "the image whose grid the others are brought onto "
                      "(DICOM series folder or file, NIfTI)", flag_values=fv)
  flags.DEFINE_multi_string("moving", [], "an image to align (repeat for several)",
                            flag_values=fv)
  flags.DEFINE_multi_string("labels", [], "a label map to align by nearest neighbour (repeat "
                            "for several)", flag_values=fv)
  flags.DEFINE_string("out", None, "NIfTI of the reference and moving images as channels",
                      flag_values=fv)
  flags.DEFINE_string("out_labels", None, "NIfTI of the aligned label maps", flag_values=fv)
  flags.DEFINE_string("figure", None, "PNG: the labels' outline on each aligned image",
                      flag_values=fv)
  flags.DEFINE_bool("assume_registered", False, "accept series on different DICOM frames of "
                    "reference (already registered by other means)", flag_values=fv)
  flags.DEFINE_float("min_overlap", align.MIN_OVERLAP, "least fraction of the smaller field of "
                     "view that must lie inside the other", flag_values=fv)
  for name in ("reference", "out"):
    flags.mark_flag_as_required(name, flag_values=fv)


@exit_on_users_error
def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  images = run(fv.reference, fv.moving, fv.labels, fv.out, fv.out_labels, fv.figure,
               fv.assume_registered, fv.min_overlap)
  print(f"align: {images.channels} channel(s) on a {'×'.join(map(str, images.shape))} grid "
        f"written to {fv.out}" + (f", figure {fv.figure}" if fv.figure else ""))
  return EXIT_OK


if __name__ == "__main__":
  define_flags()
  app.run(main)
