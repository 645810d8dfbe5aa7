"""A run exported for serving predicts what the run predicts, loaded with jax and numpy alone."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, computed_once, write_synthetic_medmnist
from helpers import config as _config

from configs import hippocampus_unet2d
from medjax.data import pipeline
from medjax.infer import export as export_lib
from medjax.infer import serving
from medjax.infer.trained import TrainedModel
from medjax.io.errors import MedjaxIOError
from medjax.train import builders, loop, tasks

CPU = ("cpu",)  # the tests that only check folder handling skip the CUDA lowering


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny trained run, exported once (per test run, `computed_once`) through the command line."""

  def train_and_export(root):
    data = write_synthetic_medmnist(root, n_train=32, n_val=16)
    workdir = os.path.join(root, "run")
    loop.train_and_evaluate(_config(data, steps=2, **{"eval.every_steps": 2}), workdir)
    out = os.path.join(root, "model")
    cmd = [sys.executable, "-m", "medjax.infer.export", "--workdir", workdir, "--out", out]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["platforms"] == ["cpu", "cuda"]
    return workdir, out

  workdir, out = computed_once(tmp_path_factory, "exported_run", train_and_export)
  trained = TrainedModel.load(workdir)
  src = trained.source("val")
  images = next(pipeline.eval_batches(src, trained.eval_transforms(),
                                      global_batch_size=len(src)))["image"]
  return {"workdir": workdir, "out": out, "trained": trained, "raw": src.images,
          "images": np.asarray(images)}


@pytest.mark.parametrize("n", [1, 7])
def test_exported_probabilities_equal_the_trained_models(run, n):
  model = serving.load_exported(run["out"])
  images = run["images"][:n]
  got = model(images)
  assert got.dtype == np.float32 and got.shape == (n, 2)
  np.testing.assert_allclose(got, run["trained"].predict_images(images), atol=1e-5)


def test_preprocess_replays_the_eval_transforms_exactly(run):
  model = serving.load_exported(run["out"])
  raw = run["raw"][:5]  # uint8 [5, 28, 28, 1], as the loader lays MedMNIST out
  np.testing.assert_array_equal(model.preprocess(raw), run["images"][:5])
  np.testing.assert_array_equal(model.preprocess(raw[..., 0]), run["images"][:5])  # npz layout
  with pytest.raises(ValueError, match="expects raw images"):
    model.preprocess(raw[:, :20])
  with pytest.raises(ValueError, match="expects images"):
    model(run["images"][:2, :20])
  assert model(run["images"][:0]).shape == (0, 2)


def test_model_json_records_what_a_server_needs(run):
  meta = json.load(open(os.path.join(run["out"], "model.json")))
  assert meta["format_version"] == serving.FORMAT_VERSION and meta["task"] == "classification"
  assert meta["input"] == {"shape": [28, 28, 1], "dtype": "float32",
                           "layout": meta["input"]["layout"]}
  assert meta["class_names"] == ["normal", "pneumonia"]
  assert meta["source"]["step"] == run["trained"].step
  assert meta["platforms"] == ["cpu", "cuda"]
  pre = meta["preprocessing"]
  assert pre["eval_transforms"] == "to_float|normalize(0.5, 0.5)"
  assert pre["data"] == {"name": "pneumoniamnist", "size": 28}
  assert [op["op"] for op in pre["ops"]] == ["to_float", "normalize"]
  assert pre["ops"][0]["scale"] == pytest.approx(1 / 255) and pre["ops"][1]["std"] == 0.5
  assert meta["module"]["sha256"] == serving.sha256_file(os.path.join(run["out"],
                                                                      "model.stablehlo"))


def test_a_bf16_run_exports_in_bf16_or_on_request_float32(run, tmp_path):
  """The run's ``train.precision`` is what its export computes in; ``precision="float32"`` keeps
  a float32 module (the weights are float32 either way)."""
  workdir = str(tmp_path / "bf16")
  shutil.copytree(run["workdir"], workdir)
  path = os.path.join(workdir, "config.json")
  saved = json.load(open(path))
  saved["train"]["precision"] = "bf16"
  json.dump(saved, open(path, "w"))
  images = run["images"][:5]
  for precision, dtype in ((None, "bf16"), ("float32", "f32")):
    out = str(tmp_path / f"model_{precision}")
    meta = export_lib.export(workdir, out, platforms=CPU, precision=precision)
    assert meta["source"]["precision"] == {"bf16": "bf16", "f32": "float32"}[dtype]
    model = serving.load_exported(out)
    text = model.exported.mlir_module()
    convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert convs and all(f"x{dtype}>" in line.rsplit("->", 1)[-1] for line in convs), convs[:2]
    got = model(images)
    assert got.dtype == np.float32
    want = run["trained"].predict_images(images)
    np.testing.assert_allclose(got, want, atol=1e-5 if dtype == "f32" else 3e-2)


def test_a_modified_module_fails_the_checksum(run, tmp_path):
  copy = str(tmp_path / "model")
  shutil.copytree(run["out"], copy)
  path = os.path.join(copy, "model.stablehlo")
  blob = bytearray(open(path, "rb").read())
  blob[len(blob) // 2] ^= 1
  open(path, "wb").write(blob)
  with pytest.raises(ValueError, match=r"model\.stablehlo: sha256 .* does not match"):
    serving.load_exported(copy)


def test_the_loader_runs_without_medjax_or_flax(run, tmp_path):
  """serving.py copied alone into a folder predicts in a fresh interpreter."""
  shutil.copy(serving.__file__, tmp_path / "serving.py")
  np.save(tmp_path / "raw.npy", run["raw"][:3])
  np.save(tmp_path / "expected.npy", run["trained"].predict_images(run["images"][:3]))
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      import serving
      model = serving.load_exported({run["out"]!r})
      probs = model(model.preprocess(np.load("raw.npy")))
      np.testing.assert_allclose(probs, np.load("expected.npy"), atol=1e-5)
      loaded = [m for m in sys.modules if m.split(".")[0] in ("flax", "medjax", "orbax", "grain")]
      print("loaded:", loaded)
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("loaded: []"), done.stdout


def test_refuses_a_folder_holding_something_else_unless_overwrite(run, tmp_path):
  trained = run["trained"]
  out = tmp_path / "model"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="--overwrite"):
    export_lib.export_trained(trained, str(out), platforms=CPU)
  assert os.listdir(out) == ["notes.txt"]
  export_lib.export_trained(trained, str(out), overwrite=True, platforms=CPU)
  assert sorted(os.listdir(out)) == ["model.json", "model.stablehlo"]
  export_lib.export_trained(trained, str(out), platforms=CPU)  # the same model: replaced freely
  meta = json.load(open(out / "model.json"))
  meta["source"]["step"] += 1  # as if another checkpoint had been exported there
  json.dump(meta, open(out / "model.json", "w"))
  with pytest.raises(FileExistsError, match="not an export of"):
    export_lib.export_trained(trained, str(out), platforms=CPU)
  assert os.listdir(tmp_path) == ["model"]  # no temporary or old folders left behind


def test_a_failed_export_leaves_the_old_folder_untouched(run, tmp_path, monkeypatch):
  out = tmp_path / "model"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")

  def broken(*args, **kwargs):
    raise OSError("disk full")

  # The checksum is taken after model.stablehlo is written, before model.json.
  monkeypatch.setattr(export_lib.serving, "sha256_file", broken)
  with pytest.raises(OSError, match="disk full"):
    export_lib.export_trained(run["trained"], str(out), overwrite=True, platforms=CPU)
  assert os.listdir(out) == ["notes.txt"]
  assert os.listdir(tmp_path) == ["model"]
  with pytest.raises(OSError, match="disk full"):
    export_lib.export_trained(run["trained"], str(tmp_path / "new"), platforms=CPU)
  assert os.listdir(tmp_path) == ["model"]


def test_a_workdir_without_a_run_names_the_missing_file(tmp_path):
  with pytest.raises(MedjaxIOError, match="config.json"):
    export_lib.export(str(tmp_path), str(tmp_path / "model"))
  assert not os.path.exists(tmp_path / "model")


def test_a_segmentation_run_exports_softmax_per_voxel_of_a_patch(tmp_path):
  """A TrainedModel built in place (the export reads nothing else) around a tiny 2-D U-Net."""
  plan = {"dims": 2, "target_spacing": [1.0, 1.0], "patch_size": [16, 16], "slice_axis": 0,
          "strides": [[1, 1], [2, 2], [2, 2]], "features": [4, 8, 16],
          "normalization": ["zscore"], "num_classes": 3, "class_names": ["bg", "outer", "core"],
          "foreground_intensity": [{"mean": 0.0, "std": 1.0, "p00_5": -3.0, "p99_5": 3.0}]}
  config = hippocampus_unet2d.get_config("runlocal")  # deep supervision: several heads
  model = builders.build_model(config.model, 3, builders.plan_model_defaults(plan))
  # Random weights of the right shapes: eager init of a U-Net costs seconds on CPU.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
  trained = TrainedModel(str(tmp_path / "run"), config, model, variables, 1,
                         tasks.get_task("segmentation"), 3, tuple(plan["class_names"]), plan)
  meta = export_lib.export_trained(trained, str(tmp_path / "model"), platforms=CPU)
  assert meta["input"]["shape"] == [16, 16, 1] and meta["output"]["shape"] == [16, 16, 3]
  assert meta["preprocessing"]["plan"]["slice_axis"] == 0
  exported = serving.load_exported(str(tmp_path / "model"))
  patches = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
  want = jax.nn.softmax(trained.logits(patches), axis=-1)
  np.testing.assert_allclose(exported(patches), want, atol=1e-5)
  with pytest.raises(NotImplementedError, match="msd_plan"):
    exported.preprocess(patches[..., 0])
