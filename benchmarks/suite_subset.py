"""A pytest plugin that keeps the tests an earlier commit's suite had, to time the same behaviour.

The suite grows with every capability; comparing its wall time with an older commit's is fair
only over the tests that commit had. A test counts as the old one when its function name was in
the old tree's ``tests/`` and either its file is the old file, or the old file no longer holds that
test (it moved). A new test that only shares a name with an old one elsewhere is left out.

  MEDJAX_SUITE_BASE=b972dd4 PYTHONPATH=benchmarks python -m pytest -q -n 2 -p suite_subset
"""

from __future__ import annotations

import os
import re
import subprocess

_DEF = re.compile(r"^(tests/\S+\.py):def (test_\w+)", re.M)


def _pairs(tree: str, root: str) -> set[tuple[str, str]]:
  """``(path, test function)`` of every test defined in ``tests/`` of git ``tree`` (a commit, or
  "" for the working tree)."""
  cmd = ["git", "grep", "-E", r"^def test_\w+", *([tree] if tree else []), "--", "tests"]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
  if tree:
    out = out.replace(f"{tree}:", "")  # git grep names the tree before each path
  return {(path, name) for path, name in _DEF.findall(out)}


def pytest_collection_modifyitems(config, items):
  base = os.environ.get("MEDJAX_SUITE_BASE")
  if not base:
    raise ValueError("suite_subset: set MEDJAX_SUITE_BASE to the commit whose tests to keep")
  root = str(config.rootpath)
  old, now = _pairs(base, root), _pairs("", root)
  old_files = {}
  for path, name in old:
    old_files.setdefault(name, set()).add(path)

  def kept(item) -> bool:
    name = getattr(item, "originalname", item.name.split("[")[0])
    path = os.path.relpath(str(item.path), root)
    if (path, name) in old:
      return True
    return name in old_files and not any((p, name) in now for p in old_files[name])

  flags = [kept(i) for i in items]
  config.hook.pytest_deselected(items=[i for i, k in zip(items, flags) if not k])
  items[:] = [i for i, k in zip(items, flags) if k]
