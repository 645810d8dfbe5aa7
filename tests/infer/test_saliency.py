"""Saliency maps: shapes on every classifier, evidence where it lies, the randomisation sanity
check, and ``predict --saliency`` writing overlays."""

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image
from scipy import stats

from medjax.data import pipeline
from medjax.infer import predict, saliency
from medjax.infer.trained import TrainedModel
from medjax.models import resnet, sequence

# The synthetic class-1 images carry their blob here (tests/conftest.py, 28² images).
BLOB = (slice(10, 18), slice(10, 18))
# Adebayo et al. 2018: maps that barely change when the weights are re-initialised do not
# explain the model. Rank correlation of trained vs random-weight maps must stay below this.
MAX_RANDOM_CORRELATION = 0.5
SEQUENCE_KW = dict(encoder="small_cnn(features=(4, 8), stem_stride=2)", hidden=8)


def _init(model, shape, seed=0):
  """Inputs of ``shape`` and random variables for ``model``: He-normal kernels, zero biases and
  running means, unit scales and variances. Drawn with numpy from ``model.init``'s shapes, since
  compiling ``model.init`` costs seconds per model on the CPU."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1])),
                         leaf.dtype)
    return (jnp.ones if name in ("scale", "var") else jnp.zeros)(leaf.shape, leaf.dtype)

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return x, jax.tree_util.tree_map_with_path(draw, shapes)


def _spearman(a, b):
  """Mean over images of the rank correlation of two maps; a constant map (a random network's
  Grad-CAM can be all zero after the ReLU) ranks nothing and counts as 0."""
  rho = [stats.spearmanr(p.ravel(), q.ravel()).statistic for p, q in zip(a, b)]
  return float(np.mean(np.nan_to_num(rho, nan=0.0)))


@pytest.fixture(scope="module")
def resnet2d():
  model = resnet.ResNetTiny(num_classes=3)
  x, v = _init(model, (2, 12, 14, 1))
  return model, v, x, saliency.Explainer(model, v)


@pytest.fixture(scope="module")
def slice_lstm():
  """A coronal slice-sequence model with attention pooling, on volumes [2, 6, 8, 10, 1]."""
  model = sequence.SliceSequenceClassifier(slice_axis="coronal", **SEQUENCE_KW)
  x, v = _init(model, (2, 6, 8, 10, 1))
  return model, v, x, saliency.Explainer(model, v)


# --------------------------------------------------------------------------------------------
# Mechanism and shapes (random weights)


def test_the_default_layer_is_the_last_conv_block(resnet2d, slice_lstm):
  _, _, x, explainer = resnet2d
  assert explainer.layer_for(x) == "BasicBlock_1"  # last block of the last stage
  model, v, x, _ = slice_lstm
  layers = saliency.feature_map_layers(model, v, x)
  # The per-slice encoder's last conv block, slices folded into the batch: [B*T, h, w, C].
  assert layers[-1] == saliency.Layer("encoder/ConvNormAct_3", (16, 2, 3, 8))


def test_interception_returns_the_plain_logits_and_its_delta_reaches_them(resnet2d):
  model, v, x, _ = resnet2d
  plain = model.apply(v, x, train=False)
  shape = (2, 6, 7, 16)
  logits, act, _ = saliency.apply_with_activation(model, v, x, "BasicBlock_1", jnp.zeros(shape))
  assert act.shape == shape
  np.testing.assert_array_equal(logits, plain)
  nudged, _, _ = saliency.apply_with_activation(model, v, x, "BasicBlock_1", jnp.ones(shape))
  assert np.abs(nudged - plain).max() > 1e-3
  with pytest.raises(ValueError, match="not a submodule"):
    saliency.apply_with_activation(model, v, x, "BasicBlock_9")


def _check_maps(maps, shape, k):
  assert maps.maps.shape == shape and maps.logits.shape == (shape[0], k)
  assert float(maps.maps.min()) >= 0.0 and float(maps.maps.max()) == pytest.approx(1.0)


def test_resnet_maps_lie_on_the_input_grid_2d(resnet2d):
  _, _, x, explainer = resnet2d
  cam, grad = explainer.gradcam(x), explainer.gradient(x, class_index=2)
  for maps in (cam, grad):
    _check_maps(maps, (2, 12, 14), 3)
    assert maps.slice_attention is None
  np.testing.assert_array_equal(cam.target, np.argmax(cam.logits, -1))  # default: predicted
  np.testing.assert_array_equal(grad.target, [2, 2])


def test_resnet_maps_lie_on_the_input_grid_3d():
  model = resnet.ResNetTiny(num_classes=3)
  x, v = _init(model, (2, 6, 8, 10, 1))
  _check_maps(saliency.Explainer(model, v).gradcam(x), (2, 6, 8, 10), 3)


def test_sequence_model_maps_follow_its_slice_axis_and_carry_the_attention(slice_lstm):
  """A coronal model on x computes what an axial one does on x with H moved first, so their
  per-slice maps must land on transposed grids (a mix-up of the axes would not)."""
  model, v, x, explainer = slice_lstm
  got = explainer.gradcam(x)
  axial = model.clone(slice_axis="axial")
  ref = saliency.Explainer(axial, v).gradcam(jnp.moveaxis(x, 2, 1))
  _check_maps(got, (2, 6, 8, 10), 2)
  np.testing.assert_allclose(got.maps, jnp.moveaxis(ref.maps, 1, 2), atol=1e-5)
  assert got.slice_attention.shape == (2, 8)
  np.testing.assert_allclose(got.slice_attention.sum(-1), 1.0, atol=1e-5)


def test_smoothgrad_is_seeded(resnet2d):
  _, _, x, explainer = resnet2d
  a, b, c = (explainer.gradient(x, smoothgrad_samples=4, seed=s).maps for s in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-4
  assert np.abs(a - explainer.gradient(x).maps).max() > 1e-4


def test_volume_overlay_cuts_through_the_maximum_and_plots_the_attention():
  rng = np.random.default_rng(0)
  heat = np.zeros((6, 8, 10), np.float32)
  heat[4, 2, 7] = 1.0
  fig = saliency.overlay_figure(rng.integers(0, 255, (6, 8, 10, 1), dtype=np.uint8), heat,
                                "tumour  p = 0.900", slice_attention=np.full(3, 1 / 3),
                                slice_indices=np.arange(3) * 2, slice_axis="coronal")
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[:3] == ["axial, slice 4", "coronal, row 2", "sagittal, column 7"]
  [bars] = [ax for ax in fig.axes if ax.get_ylabel() == "attention"]
  assert bars.get_xlabel() == "coronal slice" and len(bars.patches) == 3
  assert fig.get_suptitle() == "tumour  p = 0.900"


# --------------------------------------------------------------------------------------------
# A trained model


@pytest.fixture(scope="module")
def run(learned_run):
  """The shared tiny ResNet that has learnt the synthetic task (blob ⇒ class 1), and its val
  images."""
  workdir, summary = learned_run
  assert summary["best"]["auc"] > 0.95, summary  # else the checks below mean nothing
  trained = TrainedModel.load(workdir)
  val = trained.source("val")
  batch = next(pipeline.eval_batches(val, trained.eval_transforms(), global_batch_size=len(val)))
  positive = np.flatnonzero(np.asarray(batch["label"]).reshape(-1) == 1)[:8]
  x = jnp.asarray(batch["image"][positive], jnp.float32)
  return {"workdir": workdir, "trained": trained, "val": val, "x": x,
          "explainer": saliency.Explainer.from_trained(trained),
          # The network's own initialisation, as Adebayo et al. re-initialise.
          "random_variables": jax.jit(trained.model.init)(jax.random.key(1), x[:1])}


def test_grad_cam_of_the_trained_model_lies_on_the_blob(run):
  maps = np.asarray(run["explainer"].gradcam(run["x"], 1).maps)
  inside = np.zeros(maps.shape[1:], bool)
  inside[BLOB] = True
  per_area_in, per_area_out = maps[:, inside].mean(), maps[:, ~inside].mean()
  assert per_area_in > 2 * per_area_out, (per_area_in, per_area_out)


@pytest.mark.parametrize("method", saliency.METHODS)
def test_maps_change_when_the_weights_are_randomised(run, method):
  """Adebayo et al. 2018's model-randomisation test; the same model against itself shows the
  measure can fail it."""
  explainer, x = run["explainer"], run["x"]
  maps = np.asarray(explainer(method, x, 1).maps)
  again = np.asarray(explainer(method, x, 1).maps)
  random = np.asarray(explainer.with_variables(run["random_variables"])(method, x, 1).maps)
  assert _spearman(maps, again) == pytest.approx(1.0)
  assert _spearman(maps, random) < MAX_RANDOM_CORRELATION


def test_predict_with_saliency_writes_an_overlay_per_input(run, tmp_path):
  inbox = tmp_path / "inbox"
  (inbox / "sub").mkdir(parents=True)
  Image.fromarray(run["val"][0]["image"][..., 0]).save(inbox / "xray.png")
  Image.fromarray(run["val"][1]["image"][..., 0]).save(inbox / "sub" / "other.png")
  out = tmp_path / "out"
  fv = flags.FlagValues()
  predict.define_flags(fv)
  fv(["predict", f"--workdir={run['workdir']}", f"--input={inbox}", f"--output={out}",
      "--saliency=gradcam"])
  with contextlib.redirect_stderr(io.StringIO()):
    assert predict.main([], fv) == predict.EXIT_OK
  written = sorted(os.listdir(out / "saliency"))
  assert written == ["sub_other.png", "xray.png"]
  for name in written:
    with Image.open(out / "saliency" / name) as png:
      assert png.format == "PNG" and png.size[0] > 200
  with open(out / "predict.json") as f:
    assert json.load(f)["settings"]["saliency"] == {"method": "gradcam", "layer": None}
