r"""Pixel-level fusion of co-registered image pairs on the command line: PNGs in, fused PNGs out.

  python -m medjax.infer.fuse --a MRI/ --b CT/ --out fused/ --method pyramid,wavelet [--figure]
  python -m medjax.infer.fuse --a MRI/ --b CT/ --out fused/ --method learned --workdir runs/fuse

``--a`` and ``--b`` are two folders (images of the same file name are one pair) or two files.
Each method's results go to ``<out>/<method>/<name>.png``: grey when both sources are grey, RGB
when one is colour (PET, SPECT: fused through its luminance, its colours put back; see
`medjax.data.fusion`); ``learned`` is a network trained by ``configs/harvard_fusion.py``, fed the
same luminance. ``--figure`` also writes ``<out>/figure.png``: the first
``--figure_pairs`` pairs side by side, sources then each method.

Any problem (a missing folder or file, an unreadable image, a name in one folder only, two
images of a pair of different sizes, an unknown method) stops the run with one ``error:`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from medjax.data import fusion
from medjax.infer.trained import TrainedModel
from medjax.io.atomic import atomic_path
from medjax.io.errors import EXIT_USERS_ERROR, MedjaxIOError, exit_on_users_error
from medjax.io.harvard import read_image

EXIT_OK, EXIT_ERROR = 0, EXIT_USERS_ERROR
# The method name of a trained fusion network (``--workdir``), beside fusion.METHODS.
LEARNED = "learned"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_PANEL_INCHES, _DPI = 1.6, 160  # 256 px per panel: the atlas images at their own resolution


def load_learned(workdir: str) -> tuple[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
  """A trained fusion run (`configs/harvard_fusion.py`) as a `fusion.fuse` method.

  Returns:
    ``(pair, f)``: the pair folder it was trained on (``config.data.name``, e.g. ``"CT-MRI"``)
    and ``f(a, b)``, float ``[H, W]`` grey levels 0..255 in (a colour source's luminance, as
    `fusion.fuse` passes them and the run trained on), the fused grey levels 0..255 out, from the
    run's best checkpoint.

  Raises:
    MedjaxIOError: the workdir holds no finished run or checkpoint.
    ValueError: the run is not a fusion run.
  """
  trained = TrainedModel.load(workdir)
  if trained.config.task != "fusion":
    raise ValueError(f"{workdir}: a {trained.config.task} run, not a fusion run")

  def fuse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sources = np.stack([a, b], axis=-1)[None] / 255.0
    fused = trained.logits(jnp.asarray(sources, jnp.float32))
    return 255.0 * np.asarray(trained.task.predict_fn(fused), np.float64)[0, ..., 0]

  return trained.config.data.name, fuse


def method_functions(methods: Sequence[str], workdir: str | None = None
                     ) -> dict[str, str | Callable[[np.ndarray, np.ndarray], np.ndarray]]:
  """What `fusion.fuse` takes for each method name: the name of a classical method, or the
  trained network of ``workdir`` for `LEARNED`.

  Raises:
    ValueError: an unknown method, none, or `LEARNED` without a workdir.
  """
  unknown = [m for m in methods if m not in fusion.METHODS and m != LEARNED]
  if unknown or not methods:
    raise ValueError(f"unknown fusion method(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join([*fusion.METHODS, LEARNED])}")
  if LEARNED in methods and not workdir:
    raise ValueError(f"--method {LEARNED} needs --workdir, a trained fusion run")
  learned = load_learned(workdir)[1] if LEARNED in methods else None
  return {m: learned if m == LEARNED else m for m in methods}


def find_pairs(a: str, b: str) -> list[tuple[str, str, str]]:
  """``(name, path in a, path in b)`` for two files or for two folders' namesake images, sorted.

  Raises:
    MedjaxIOError: a path is missing, one is a folder and the other a file, a folder holds no
      image, or an image has no namesake in the other folder.
  """
  for path in (a, b):
    if not os.path.exists(path):
      raise MedjaxIOError(path, "no such file or folder")
  if os.path.isfile(a) and os.path.isfile(b):
    return [(os.path.splitext(os.path.basename(a))[0], a, b)]
  if not (os.path.isdir(a) and os.path.isdir(b)):
    raise MedjaxIOError(b if os.path.isdir(a) else a,
                        "--a and --b must be two folders or two files")
  names = [{n for n in os.listdir(d) if n.lower().endswith(IMAGE_SUFFIXES)} for d in (a, b)]
  if not names[0]:
    raise MedjaxIOError(a, "no PNG/JPEG/BMP/TIFF image in the folder")
  for folder, mine, other in ((a, names[0], names[1]), (b, names[1], names[0])):
    alone = sorted(mine - other)
    if alone:
      raise MedjaxIOError(os.path.join(folder, alone[0]),
                          f"no namesake in the other folder ({len(alone)} such file(s))")
  return [(os.path.splitext(n)[0], os.path.join(a, n), os.path.join(b, n))
          for n in sorted(names[0])]


def read_pair(path_a: str, path_b: str) -> tuple[np.ndarray, np.ndarray]:
  """Both images of a pair (uint8 grey or RGB); MedjaxIOError if their sizes differ."""
  image_a, image_b = read_image(path_a), read_image(path_b)
  if image_a.shape[:2] != image_b.shape[:2]:
    raise MedjaxIOError(path_b, f"{image_b.shape[1]}x{image_b.shape[0]} pixels, but its pair "
                        f"{path_a} has {image_a.shape[1]}x{image_a.shape[0]}")
  return image_a, image_b


def write_png(path: str, image: np.ndarray) -> None:
  """A uint8 ``[H, W]`` or ``[H, W, 3]`` array as a PNG, atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path, suffix=".png") as tmp:
    Image.fromarray(np.ascontiguousarray(image)).save(tmp)


def side_by_side(rows: Sequence[tuple[str, np.ndarray, np.ndarray, Mapping[str, np.ndarray]]],
                 labels: tuple[str, str] = ("A", "B")) -> Figure:
  """A grid figure: one row per pair, columns the two sources then each fused result.

  Args:
    rows: ``(title, a, b, {method: fused})``, images uint8 grey ``[H, W]`` or RGB ``[H, W, 3]``.
    labels: the two sources' column titles (e.g. ``("MRI", "CT")``).
  """
  methods = list(rows[0][3])
  cols = 2 + len(methods)
  fig = Figure(figsize=(_PANEL_INCHES * cols, _PANEL_INCHES * len(rows) + 0.3))
  axes = fig.subplots(len(rows), cols, squeeze=False)
  for r, (title, a, b, fused) in enumerate(rows):
    for c, (name, image) in enumerate([(labels[0], a), (labels[1], b), *fused.items()]):
      ax = axes[r, c]
      ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
                interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=8)
      if c == 0:
        ax.set_ylabel(title, fontsize=7)
  fig.subplots_adjust(left=0.03, right=0.995, bottom=0.005, top=1 - 0.3 / fig.get_figheight(),
                      wspace=0.02, hspace=0.02)
  return fig


def save_figure(fig: Figure, path: str) -> None:
  """Writes ``fig`` as a PNG at the resolution that shows each panel's pixels, atomically.

  Grey when nothing in it has colour (lossless); otherwise 256 colours chosen for the figure
  (a third of the bytes of RGB, the tracer colour maps and grey levels kept closely enough to
  read, not to measure: the metrics are computed on the written fused images).
  """
  fig.set_dpi(_DPI)
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  rgb = np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
  image = Image.fromarray(rgb[..., 0] if (rgb == rgb[..., :1]).all() else rgb)
  if image.mode == "RGB":
    image = image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path, suffix=".png") as tmp:
    image.save(tmp, optimize=True)


def fuse_folder(a: str, b: str, out: str, methods: Sequence[str], figure_pairs: int = 0,
                workdir: str | None = None) -> dict[str, int]:
  """Fuses every pair of ``a`` and ``b`` with each method into ``out/<method>/<name>.png``.

  Args:
    figure_pairs: if > 0, the first that many pairs go into ``out/figure.png``.
    workdir: the trained fusion run of method `LEARNED`.

  Returns:
    ``{"pairs": n, "written": n * len(methods)}``.
  """
  functions = method_functions(methods, workdir)
  pairs = find_pairs(a, b)
  rows = []
  for name, path_a, path_b in pairs:
    image_a, image_b = read_pair(path_a, path_b)
    results = {m: fusion.to_uint8(fusion.fuse(image_a, image_b, f)) for m, f in functions.items()}
    for m, image in results.items():
      write_png(os.path.join(out, m, f"{name}.png"), image)
    if len(rows) < figure_pairs:
      rows.append((name, image_a, image_b, results))
  if rows:
    labels = (os.path.basename(os.path.normpath(a)), os.path.basename(os.path.normpath(b)))
    save_figure(side_by_side(rows, labels), os.path.join(out, "figure.png"))
  return {"pairs": len(pairs), "written": len(pairs) * len(methods)}


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("a", None, "first source: a folder of images or one image (e.g. MRI)",
                      flag_values=fv)
  flags.DEFINE_string("b", None, "second source: a folder or an image (e.g. CT, PET, SPECT)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output folder: <out>/<method>/<name>.png", flag_values=fv)
  flags.DEFINE_list("method", ["pyramid"], f"fusion methods, comma-separated: "
                    f"{', '.join([*fusion.METHODS, LEARNED])}", flag_values=fv)
  flags.DEFINE_string("workdir", None, f"a trained fusion run (configs/harvard_fusion.py), for "
                      f"--method {LEARNED}", flag_values=fv)
  flags.DEFINE_bool("figure", False, "also write <out>/figure.png (sources and each method)",
                    flag_values=fv)
  flags.DEFINE_integer("figure_pairs", 3, "pairs in the --figure", flag_values=fv)
  for name in ("a", "b", "out"):
    flags.mark_flag_as_required(name, flag_values=fv)


@exit_on_users_error
def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  summary = fuse_folder(fv.a, fv.b, fv.out, fv.method,
                        figure_pairs=fv.figure_pairs if fv.figure else 0, workdir=fv.workdir)
  print(f"fuse: {summary['pairs']} pair(s), {summary['written']} image(s) written to {fv.out}"
        + (f", figure {os.path.join(fv.out, 'figure.png')}" if fv.figure else ""))
  return EXIT_OK


if __name__ == "__main__":
  define_flags()
  app.run(main)
