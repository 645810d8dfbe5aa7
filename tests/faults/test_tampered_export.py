"""An exported model whose ``model.json`` was edited is refused with one clear line: the manifest
is covered by a digest, its module must lie inside the folder, a missing key is named."""

import json
import os
import shutil

import numpy as np
import pytest

from medjax.data import pipeline
from medjax.infer import export as export_lib
from medjax.infer import serving
from medjax.infer.trained import TrainedModel


@pytest.fixture(scope="module")
def exported(learned_run, tmp_path_factory):
  """``learned_run`` exported for the CPU, with val images preprocessed and their probabilities."""
  trained = TrainedModel.load(learned_run[0])
  out = str(tmp_path_factory.mktemp("export") / "model")
  export_lib.export_trained(trained, out, platforms=("cpu",))
  src = trained.source("val")
  images = np.asarray(next(pipeline.eval_batches(src, trained.eval_transforms(),
                                                 global_batch_size=8))["image"])
  return {"out": out, "raw": src.images[:8], "probs": trained.predict_images(images)}


def _copy(exported, tmp_path, edit=None):
  """A copy of the export in ``tmp_path/model``, its model.json passed through ``edit``."""
  folder = str(tmp_path / "model")
  shutil.copytree(exported["out"], folder)
  path = os.path.join(folder, serving.METADATA_FILE)
  if edit is not None:
    meta = json.load(open(path))
    edit(meta)
    json.dump(meta, open(path, "w"), indent=1)
  return folder


def test_an_untouched_export_loads_and_predicts_as_the_run(exported, tmp_path, capsys):
  folder = _copy(exported, tmp_path)
  model = serving.load_exported(folder)
  np.testing.assert_allclose(model(model.preprocess(exported["raw"])), exported["probs"],
                             atol=1e-5)
  assert serving.main([folder]) == 0
  assert json.loads(capsys.readouterr().out)["class_names"] == ["normal", "pneumonia"]


def _normalize(meta):
  return next(op for op in meta["preprocessing"]["ops"] if op["op"] == "normalize")


def test_an_edited_normalisation_is_refused_by_the_command_line(exported, tmp_path, capsys):
  folder = _copy(exported, tmp_path, lambda meta: _normalize(meta).update(mean=0.4))
  with pytest.raises(serving.ExportError, match=r"model\.json: edited since export"):
    serving.load_exported(folder)
  assert serving.main([folder]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "model.json" in err[0], err


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_a_module_outside_the_export_folder_is_refused(exported, tmp_path, where):
  outside = tmp_path / "elsewhere" / serving.MODULE_FILE  # a valid module: only its place is wrong
  outside.parent.mkdir()
  shutil.copy(os.path.join(exported["out"], serving.MODULE_FILE), outside)
  name = {"dotdot": f"../elsewhere/{serving.MODULE_FILE}", "absolute": str(outside),
          "symlink": serving.MODULE_FILE}[where]
  folder = _copy(exported, tmp_path, lambda meta: meta["module"].update(file=name))
  if where == "symlink":
    os.remove(os.path.join(folder, serving.MODULE_FILE))
    os.symlink(outside, os.path.join(folder, serving.MODULE_FILE))
  with pytest.raises(serving.ExportError, match="lies outside the export folder"):
    serving.load_exported(folder)


@pytest.mark.parametrize("key", ["module.sha256", "manifest_sha256"])
def test_a_deleted_digest_is_named_not_a_key_error(exported, tmp_path, key):
  def delete(meta):
    *parents, last = key.split(".")
    node = meta
    for p in parents:
      node = node[p]
    del node[last]

  folder = _copy(exported, tmp_path, delete)
  with pytest.raises(serving.ExportError, match=rf"model\.json: no '{key}'"):
    serving.load_exported(folder)
