r"""The fusion results table: each method scored with the eight fusion metrics on a split of the
Harvard atlas pairs.

  python -m medjax.evaluate.fusion --out runs/fusion_eval [--split test]
      [--pairs CT-MRI,PET-MRI,SPECT-MRI] [--methods mean,max,pyramid,wavelet[,copy_a,copy_b]]
      [--data_dir $MEDJAX_DATA_DIR/fusion/harvard_aanlib] [--figure_dir docs/figures]
      [--workdir runs/fuse_ctmri,runs/fuse_petmri,...]   # with --methods ...,learned

Every pair of the split is fused by each method (`medjax.infer.fuse`'s path: fused, rounded to
the uint8 that would be written) and scored on grey levels as the field's evaluation code does
(`medjax.metrics.fusion.score`). Written to ``--out``: ``fusion_scores.csv`` (one row per image
and method), ``fusion_table.md`` (the mean of each metric per pair folder and method, with the
test cases) and ``fusion_table.json``; the table is also printed. ``--figure_dir`` adds one
side-by-side figure per pair folder, ``fusion_<pair>.png`` (``--figure_rows`` slices of the split,
evenly spaced). Method ``learned`` is a trained fusion network (``configs/harvard_fusion.py``) fed
the same luminance as the classical methods: ``--workdir`` lists the runs, each used on the pair
folder it was trained on. Errors: one ``error:`` line on stderr, exit status 2.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Callable, Mapping, Sequence

import numpy as np
from absl import app, flags

from medjax.data import fusion
from medjax.infer import fuse as fuse_cli
from medjax.io import harvard
from medjax.io.atomic import atomic_open, atomic_write, atomic_write_json
from medjax.io.errors import MedjaxIOError
from medjax.metrics.fusion import METRICS, score

# Not fusion: one source returned as the result (its grey levels; a colour source's colours kept),
# to show which metrics reward copying a source. Accepted by --methods beside fusion.METHODS.
COPIES = {"copy_a": lambda a, b: a, "copy_b": lambda a, b: b}


def _check(methods: Sequence[str]) -> None:
  known = [*fusion.METHODS, fuse_cli.LEARNED, *COPIES]
  unknown = [m for m in methods if m not in known]
  if unknown or not methods:
    raise ValueError(f"unknown fusion method(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(known)}")


def learned_by_pair(workdirs: Sequence[str]) -> dict[str, Callable]:
  """``{pair folder: the fuse function of the run trained on it}`` (`fuse_cli.load_learned`).

  Raises:
    ValueError: two runs trained on the same pair folder.
  """
  learned: dict[str, Callable] = {}
  for workdir in workdirs:
    pair, function = fuse_cli.load_learned(workdir)
    if pair in learned:
      raise ValueError(f"two --workdir runs were trained on {pair}; give one per pair folder")
    learned[pair] = function
  return learned


def evaluate_pairs(root: str, pair: str, methods: Sequence[str], split: str = "test",
                   figure_rows: int = 0, functions: Mapping[str, Callable] | None = None
                   ) -> dict:
  """Scores ``methods`` on the ``split`` of one pair folder; ``functions`` gives the fuse
  function of methods that are not names `fusion.fuse` knows (``learned``).

  Returns:
    ``{"pair", "split", "cases", "count", "rows": [per image and method: {"id", "method",
    <metric>: value}], "mean": {method: {metric: mean}}, "figure": the side_by_side rows}``.
  """
  pairs = harvard.read_pairs(root, pair, split)
  if not pairs:
    raise MedjaxIOError(os.path.join(root, pair), f"no pairs on the {split} split")
  picks = {round((i + 1) * len(pairs) / (figure_rows + 1)) for i in range(figure_rows)}
  rows, figure = [], []
  for index, p in enumerate(pairs):
    results = {m: fusion.to_uint8(fusion.fuse(p.a, p.b, (functions or {}).get(m) or
                                              COPIES.get(m, m))) for m in methods}
    for m, fused in results.items():
      rows.append({"id": p.id, "method": m, **score(fused, p.a, p.b)})
    if index in picks:
      figure.append((f"case {p.case} slice {p.slice}", p.a, p.b, results))
  # SCD of an exact copy is NaN (F - A = 0 correlates with nothing): the mean says so.
  mean = {m: {k: float(np.mean([r[k] for r in rows if r["method"] == m])) for k in METRICS}
          for m in methods}
  return {"pair": pair, "split": split, "cases": sorted({p.case for p in pairs}),
          "count": len(pairs), "rows": rows, "mean": mean, "figure": figure}


def markdown_table(results: Sequence[dict]) -> str:
  """The mean of each metric per pair folder and method, as a Markdown table."""
  lines = ["| pair | method | " + " | ".join(METRICS) + " |",
           "|---|---|" + "---:|" * len(METRICS)]
  for res in results:
    for method, means in res["mean"].items():
      lines.append(f"| {res['pair']} | {method} | "
                   + " | ".join(f"{means[k]:.2f}" for k in METRICS) + " |")
  notes = [f"- {res['pair']}: {res['count']} pairs of cases "
           f"{', '.join(map(str, res['cases']))} ({res['split']} split)" for res in results]
  return "\n".join(lines + [""] + notes) + "\n"


def evaluate(root: str, out: str, pairs: Sequence[str] = harvard.PAIRS,
             methods: Sequence[str] = tuple(fusion.METHODS), split: str = "test",
             figure_dir: str | None = None, figure_rows: int = 2,
             workdirs: Sequence[str] = ()) -> list[dict]:
  """`evaluate_pairs` for each pair folder; writes the CSV, table and JSON (and figures).

  Args:
    workdirs: trained fusion runs, one per pair folder, for method ``learned``.

  Raises:
    ValueError: an unknown method, or ``learned`` for a pair folder no run was trained on.
  """
  _check(methods)
  learned = learned_by_pair(workdirs) if fuse_cli.LEARNED in methods else {}
  missing = [p for p in pairs if fuse_cli.LEARNED in methods and p not in learned]
  if missing:
    raise ValueError(f"method {fuse_cli.LEARNED} on {', '.join(missing)}: no --workdir run was "
                     f"trained on {'it' if len(missing) == 1 else 'them'}")
  results = [evaluate_pairs(root, p, methods, split, figure_rows if figure_dir else 0,
                            {fuse_cli.LEARNED: learned[p]} if p in learned else None)
             for p in pairs]
  os.makedirs(out, exist_ok=True)
  with atomic_open(os.path.join(out, "fusion_scores.csv"), newline="") as f:
    writer = csv.DictWriter(f, ["pair", "id", "method", *METRICS])
    writer.writeheader()
    for res in results:
      for row in res["rows"]:
        writer.writerow({"pair": res["pair"], **row,
                         **{k: f"{row[k]:.6f}" for k in METRICS}})
  table = markdown_table(results)
  atomic_write(os.path.join(out, "fusion_table.md"), table)
  atomic_write_json(os.path.join(out, "fusion_table.json"),
                    [{k: res[k] for k in ("pair", "split", "cases", "count", "mean")}
                     for res in results], indent=1)
  if figure_dir:
    for res in results:
      labels = harvard.modalities(res["pair"])
      fig = fuse_cli.side_by_side(res["figure"], labels)
      fuse_cli.save_figure(fig, os.path.join(figure_dir, f"fusion_{res['pair']}.png"))
  return results


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("data_dir", None, "the atlas folder (default: "
                      "$MEDJAX_DATA_DIR/fusion/harvard_aanlib)", flag_values=fv)
  flags.DEFINE_string("out", None, "output folder for the table, scores and JSON", flag_values=fv)
  flags.DEFINE_enum("split", "test", ["test", "train", "all"], "which cases", flag_values=fv)
  flags.DEFINE_list("pairs", list(harvard.PAIRS), "pair folders", flag_values=fv)
  flags.DEFINE_list("methods", list(fusion.METHODS), "fusion methods (also learned, with "
                    "--workdir; copy_a, copy_b: a source as the result)", flag_values=fv)
  flags.DEFINE_list("workdir", [], "trained fusion runs (configs/harvard_fusion.py), one per "
                    "pair folder, for method learned", flag_values=fv)
  flags.DEFINE_string("figure_dir", None, "write fusion_<pair>.png figures here", flag_values=fv)
  flags.DEFINE_integer("figure_rows", 2, "slices per figure", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = fv.data_dir or os.path.join(os.environ.get("MEDJAX_DATA_DIR", ""),
                                     "fusion", "harvard_aanlib")
  try:
    results = evaluate(root, fv.out, fv.pairs, fv.methods, fv.split, fv.figure_dir,
                       fv.figure_rows, fv.workdir)
  except (MedjaxIOError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(markdown_table(results), end="")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
