"""Saliency maps for the classifiers (Grad-CAM, input gradients, SmoothGrad) and their PNG overlays.

No model file knows about this. `flax.linen.intercept_methods` catches the output of the target
submodule's ``__call__`` and adds a zero ``delta`` to it. The forward pass stays exactly the same,
and ``jax.grad`` with respect to ``delta`` gives d score / d activation. This works for the 2-D
and 3-D ResNets, for the slice-sequence models (their per-slice encoder's maps
``[B*T, h, w, C]`` are put back on the volume) and for the 2.5-D slices-as-channels ResNet (its
in-plane map is spread along the slice axis). The score is the logit of the chosen class, by
default the predicted one. Every map is normalised to [0, 1] per image: it shows where the
evidence lies in that image, and it cannot be compared in size between images or methods.

  python -m medjax.infer.predict --workdir runs/pneumonia --input scans/ --output out/ \
      --saliency gradcam

writes ``out/saliency/<input>.png`` for every classified input (`predict_hook`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.cm
import numpy as np
from matplotlib.figure import Figure

from medjax.data import pipeline
from medjax.data.sources import ArraySource
from medjax.infer.inputs import output_stem
from medjax.infer.trained import TrainedModel, find_sown
from medjax.models.sequence import SLICE_AXES

METHODS = ("gradcam", "gradient")
# SmoothGrad (Smilkov et al. 2017): the noise's standard deviation, as a fraction of each
# image's intensity range (their recommended 10-20 %).
SMOOTHGRAD_SIGMA = 0.15
# The heat map's opacity on the overlays at 1; it fades out towards 0, so where nothing raised
# the score the image shows unchanged.
_OVERLAY_ALPHA = 0.6
_HEAT_CMAP = "turbo"
_DPI = 110


class Maps(NamedTuple):
  """Saliency of a batch.

  Attributes:
    maps: ``[B, *spatial]`` float32 in [0, 1], on the input's grid (all zero when nothing in the
      image raised the score).
    logits: ``[B, K]``, the model's outputs (the same as a plain ``apply``).
    target: ``[B]`` int32, the class whose logit was explained.
    slice_attention: ``[B, T]`` attention weights over the kept slices where the model sows
      ``slice_attention`` (attention-pooled slice-sequence models), else None.
  """

  maps: jax.Array
  logits: jax.Array
  target: jax.Array
  slice_attention: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Layer:
  """A submodule whose ``__call__`` returns a feature map.

  Attributes:
    path: its module path joined by ``/`` (``"BasicBlock_1"``, ``"encoder/ConvNormAct_3"``).
    shape: its output shape, ``[N, *spatial, C]`` (``N = B * T`` in a per-slice encoder).
  """

  path: str
  shape: tuple[int, ...]


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


def _logits(outputs: Any) -> jax.Array:
  if isinstance(outputs, (list, tuple)):  # deep-supervision heads: the full-size one
    outputs = outputs[0]
  return outputs.astype(jnp.float32)


def apply_with_activation(model: nn.Module, variables: Any, images: jax.Array,
                          layer: str | None, delta: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array | None, dict]:
  """``model.apply(variables, images, train=False)`` that also returns ``layer``'s output.

  Args:
    model: a classifier called as ``model(x, train)``.
    variables: its ``{"params", "batch_stats"}``.
    images: ``[B, *spatial, C]``, preprocessed as the model was trained.
    layer: a module path (`Layer.path`), or None to intercept nothing.
    delta: added to ``layer``'s output, so the gradient with respect to a zero ``delta`` is the
      gradient with respect to the activation; None adds nothing.

  Returns:
    ``(logits [B, K] float32, activation of layer (before delta) or None, intermediates)``.

  Raises:
    ValueError: no submodule has path ``layer``, or its ``__call__`` ran more than once (a
      shared module, or one inside a scan): there is no single activation to explain.
  """
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if layer is None or context.method_name != "__call__" or _path(context.module) != layer:
      return out
    captured.append(out)
    return out if delta is None else out + delta.astype(out.dtype)

  with nn.intercept_methods(interceptor):
    outputs, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  if layer is not None and len(captured) != 1:
    raise ValueError(f"layer {layer!r} " + (
        "is not a submodule of the model (see feature_map_layers)" if not captured else
        f"ran {len(captured)} times in one forward pass; pick a module called once"))
  return _logits(outputs), captured[0] if captured else None, state.get("intermediates", {})


def feature_map_layers(model: nn.Module, variables: Any, images: Any) -> list[Layer]:
  """The submodules whose ``__call__`` returns a feature map ``[N, *spatial, C]`` (rank >= 4).

  Listed in the order their calls return, so a block comes after the layers inside it and the
  last entry is the network's last convolutional block: the last block of a ResNet's last stage,
  or the last conv block of a slice-sequence model's per-slice encoder. Nothing is computed
  (``jax.eval_shape``).

  Args:
    model, variables: as for `apply_with_activation`.
    images: ``[B, *spatial, C]`` or its ``jax.ShapeDtypeStruct``.
  """
  found = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and getattr(out, "ndim", 0) >= 4:
      found.append(Layer(_path(context.module), tuple(out.shape)))
    return out

  def forward(variables, images):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, images, train=False, mutable=["intermediates"])

  jax.eval_shape(forward, variables, images)
  return found


def _slices_to_volume(cam: jax.Array, batch: int, spatial: Sequence[int],
                      model: nn.Module) -> jax.Array:
  """Per-slice maps ``[B*T, h, w]`` of a volume batch → ``[B, D, H, W]``.

  The slices are those of `medjax.models.sequence.slices_first`: the model's ``slice_axis``
  (axial when it has none) moved to the front, every ``slice_stride``-th kept. The T maps are
  stretched linearly over the whole axis, so with a stride > 1 they lie up to half a stride off
  the slices they were computed on. A 2.5-D model's one in-plane map (T = 1) is spread along the
  slice axis unchanged.
  """
  if cam.shape[0] % batch:
    raise ValueError(f"{cam.shape[0]} per-slice maps for a batch of {batch} volumes")
  axis = SLICE_AXES[getattr(model, "slice_axis", "axial")]
  in_plane = [n for i, n in enumerate(spatial) if i != axis - 1]
  cam = cam.reshape(batch, cam.shape[0] // batch, *cam.shape[1:])  # [B, T, h, w]
  cam = jax.image.resize(cam, (batch, spatial[axis - 1], *in_plane), "linear")
  return jnp.moveaxis(cam, 1, axis)


def _normalise(maps: jax.Array) -> jax.Array:
  """Each map divided by its maximum (maps are >= 0); all-zero maps stay zero."""
  peak = jnp.max(maps, axis=tuple(range(1, maps.ndim)), keepdims=True)
  return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


def _targets(logits: jax.Array, target: jax.Array) -> jax.Array:
  """``target`` where >= 0, else the predicted class."""
  return jnp.where(target >= 0, target, jnp.argmax(logits, -1)).astype(jnp.int32)


class Explainer:
  """Grad-CAM and gradient saliency for one model and its weights, jitted and batched.

  Attributes:
    model: a classifier called as ``model(x, train)`` returning logits ``[B, K]``.
    variables: its ``{"params", "batch_stats"}``.
    layer: the Grad-CAM layer's module path (`Layer.path`); None picks the last feature map
      (`feature_map_layers`) of each input shape.
  """

  def __init__(self, model: nn.Module, variables: Any, layer: str | None = None):
    self.model = model
    self.variables = variables
    self.layer = layer
    self._default_layers: dict[tuple, str] = {}
    self._gradcam = jax.jit(self._gradcam_fn, static_argnames="layer")
    self._gradient = jax.jit(self._gradient_fn)

  @classmethod
  def from_trained(cls, trained: TrainedModel, layer: str | None = None) -> Explainer:
    return cls(trained.model, trained.variables, layer)

  def with_variables(self, variables: Any) -> Explainer:
    """The same model and layer with other weights of the same shapes (another checkpoint, or a
    re-initialised network for the randomisation check), reusing the compiled functions."""
    other = copy.copy(self)
    other.variables = variables
    return other

  def layer_for(self, images: Any) -> str:
    """The Grad-CAM layer for inputs shaped like ``images``."""
    if self.layer is not None:
      return self.layer
    key = (tuple(images.shape), str(images.dtype))
    if key not in self._default_layers:
      layers = feature_map_layers(self.model, self.variables,
                                  jax.ShapeDtypeStruct(images.shape, images.dtype))
      if not layers:
        raise ValueError(f"{type(self.model).__name__} has no submodule returning a feature map")
      self._default_layers[key] = layers[-1].path
    return self._default_layers[key]

  # --- Grad-CAM (Selvaraju et al. 2017) ------------------------------------------------------

  def _gradcam_fn(self, variables, images, target, layer):
    model = self.model
    _, activation, _ = jax.eval_shape(
        lambda v, x: apply_with_activation(model, v, x, layer), variables, images)

    def score(delta):
      logits, act, intermediates = apply_with_activation(model, variables, images, layer, delta)
      k = _targets(logits, target)
      # Examples do not interact in evaluation mode (running batch statistics), so the gradient
      # of the summed scores is each example's own.
      s = jnp.sum(jnp.take_along_axis(logits, k[:, None], axis=1))
      return s, (logits, act, k, intermediates)

    zeros = jnp.zeros(activation.shape, activation.dtype)
    grads, (logits, act, k, intermediates) = jax.grad(score, has_aux=True)(zeros)
    act, grads = act.astype(jnp.float32), grads.astype(jnp.float32)
    spatial_axes = tuple(range(1, act.ndim - 1))
    weights = jnp.mean(grads, axis=spatial_axes, keepdims=True)  # [N, 1.., C]
    cam = jax.nn.relu(jnp.sum(weights * act, axis=-1))  # [N, *s]
    spatial = images.shape[1:-1]
    if cam.ndim == len(spatial) + 1 and cam.shape[0] == images.shape[0]:
      cam = jax.image.resize(cam, (cam.shape[0], *spatial), "linear")
    elif len(spatial) == 3 and cam.ndim == 3:  # per-slice (or in-plane) maps of volumes
      cam = _slices_to_volume(cam, images.shape[0], spatial, model)
    else:
      raise ValueError(f"layer {layer!r} gives maps {cam.shape}, which cannot be placed on "
                       f"inputs {images.shape}")
    return Maps(_normalise(cam), logits, k, find_sown(intermediates, "slice_attention"))

  def gradcam(self, images: Any, class_index: int | Sequence[int] | None = None) -> Maps:
    """Grad-CAM: ReLU(sum_c mean-gradient_c · A_c) at ``layer``, linearly upsampled.

    Args:
      images: ``[B, *spatial, C]`` float, preprocessed as in evaluation.
      class_index: the class to explain, one for all or one per image; None (or -1): each
        image's predicted (arg-max) class.
    """
    images = jnp.asarray(images)
    return self._gradcam(self.variables, images, self._target(class_index, len(images)),
                         layer=self.layer_for(images))

  # --- Gradients (Simonyan et al. 2014) and SmoothGrad (Smilkov et al. 2017) ----------------

  def _gradient_fn(self, variables, images, target, samples, sigma, key):
    model = self.model
    logits, _, intermediates = apply_with_activation(model, variables, images, None)
    k = _targets(logits, target)

    def grad(x):
      def score(x):
        out, _, _ = apply_with_activation(model, variables, x, None)
        return jnp.sum(jnp.take_along_axis(out, k[:, None], axis=1))
      return jax.grad(score)(x).astype(jnp.float32)

    axes = tuple(range(1, images.ndim))
    spread = jnp.max(images, axes, keepdims=True) - jnp.min(images, axes, keepdims=True)
    scale = (sigma * spread).astype(images.dtype)

    def add_sample(i, total):
      noise = jax.random.normal(jax.random.fold_in(key, i), images.shape, images.dtype)
      return total + grad(images + noise * scale)

    # samples = 0 is the plain gradient: one pass, no noise.
    n = jnp.maximum(samples, 1)
    scale = jnp.where(samples > 0, scale, 0)
    total = jax.lax.fori_loop(0, n, add_sample, jnp.zeros(images.shape, jnp.float32))
    maps = jnp.max(jnp.abs(total / n), axis=-1)  # over channels
    return Maps(_normalise(maps), logits, k, find_sown(intermediates, "slice_attention"))

  def gradient(self, images: Any, class_index: int | Sequence[int] | None = None, *,
               smoothgrad_samples: int = 0, sigma: float = SMOOTHGRAD_SIGMA,
               seed: int = 0) -> Maps:
    """|d score / d input|, the maximum over channels; SmoothGrad when ``smoothgrad_samples``.

    Args:
      images, class_index: as for `gradcam`.
      smoothgrad_samples: 0: the plain gradient; n > 0: the gradient averaged over n copies of
        each image with Gaussian noise added (SmoothGrad), then its absolute value.
      sigma: the noise's standard deviation as a fraction of each image's intensity range.
      seed: the noise's seed (the same seed gives the same maps).
    """
    images = jnp.asarray(images)
    if smoothgrad_samples < 0 or sigma < 0:
      raise ValueError(f"smoothgrad_samples and sigma must be >= 0, got {smoothgrad_samples}, "
                       f"{sigma}")
    return self._gradient(self.variables, images, self._target(class_index, len(images)),
                          jnp.int32(smoothgrad_samples), jnp.float32(sigma),
                          jax.random.key(seed))

  def __call__(self, method: str, images: Any, class_index=None, **kwargs) -> Maps:
    """`gradcam` or `gradient` by name (`METHODS`)."""
    if method not in METHODS:
      raise ValueError(f"saliency method {method!r}; expected one of {', '.join(METHODS)}")
    return getattr(self, method)(images, class_index, **kwargs)

  @staticmethod
  def _target(class_index, batch: int) -> jax.Array:
    if class_index is None:
      return jnp.full((batch,), -1, jnp.int32)
    target = np.broadcast_to(np.asarray(class_index, np.int32), (batch,))
    return jnp.asarray(target)


# --------------------------------------------------------------------------------------------
# Overlays: arrays in, a figure out. Figures are built without pyplot (no global backend or state).


def _display(image: np.ndarray) -> tuple[np.ndarray, dict]:
  """An image ``[..., C]`` (C 1 or 3; uint8 or float) as imshow input in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  else:
    lo, hi = float(np.min(image)), float(np.max(image))
    image = (image.astype(np.float32) - lo) / (hi - lo if hi > lo else 1.0)
  if image.shape[-1] == 1:
    return image[..., 0], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
  return np.clip(image, 0.0, 1.0), {}


def _overlay(ax, image: np.ndarray, heat: np.ndarray, label: str, **imshow) -> Any:
  picture, style = _display(image)
  ax.imshow(picture, interpolation="nearest", **style, **imshow)
  shown = ax.imshow(heat, cmap=_HEAT_CMAP, vmin=0.0, vmax=1.0,
                    alpha=_OVERLAY_ALPHA * np.clip(heat, 0.0, 1.0), interpolation="bilinear",
                    **imshow)
  ax.set_title(label, fontsize=9)
  ax.set_axis_off()
  return shown


def _colour_scale(shown: Any) -> Any:
  # The overlay's opacity varies per pixel; the colour bar shows the colours themselves.
  return matplotlib.cm.ScalarMappable(shown.norm, shown.cmap)


def overlay_figure(image: np.ndarray, heatmap: np.ndarray, title: str,
                   slice_attention: np.ndarray | None = None,
                   slice_indices: np.ndarray | None = None, slice_axis: str = "axial") -> Figure:
  """The image with its heat map.

  2-D: the image, and the image under the heat map. 3-D: the three orthogonal slices through
  the heat map's maximum (the middle slices where the map is all zero), each under the map;
  with ``slice_attention`` a bar plot of the weights below them.

  Args:
    image: ``[H, W, C]`` or ``[D, H, W, C]`` (C 1 or 3; uint8 as stored, or float).
    heatmap: ``[H, W]`` or ``[D, H, W]`` in [0, 1].
    title: the figure's title. Callers put the predicted class and its probability here and
      nothing else: no patient field may reach a saved figure.
    slice_attention: ``[T]`` attention weights over slices, or None.
    slice_indices: ``[T]`` the input slice of each weight (default ``0 .. T-1``).
    slice_axis: the orientation of those slices, for the bar plot's axis label.
  """
  image, heatmap = np.asarray(image), np.asarray(heatmap, np.float32)
  if image.shape[:-1] != heatmap.shape:
    raise ValueError(f"image {image.shape} and heat map {heatmap.shape} differ in shape")
  if heatmap.ndim == 2:
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    picture, style = _display(image)
    left.imshow(picture, interpolation="nearest", **style)
    left.set_title("image", fontsize=9)
    left.set_axis_off()
    shown = _overlay(right, image, heatmap, "saliency")
    fig.colorbar(_colour_scale(shown), ax=right, fraction=0.046, pad=0.04)
  elif heatmap.ndim == 3:
    rows = 2 if slice_attention is not None else 1
    fig = Figure(figsize=(9.0, 3.2 + 1.8 * (rows - 1)), layout="constrained")
    grid = fig.add_gridspec(rows, 3, height_ratios=[3, 1.5][:rows])
    peak = (np.unravel_index(int(np.argmax(heatmap)), heatmap.shape) if heatmap.max() > 0
            else tuple(n // 2 for n in heatmap.shape))
    d, h, w = (int(i) for i in peak)
    # [D, H, W] is an axial stack (inferior → superior): coronal and sagittal cuts are drawn
    # with the last slice at the top.
    views = ((f"axial, slice {d}", image[d], heatmap[d], {}),
             (f"coronal, row {h}", image[:, h], heatmap[:, h], {"origin": "lower"}),
             (f"sagittal, column {w}", image[:, :, w], heatmap[:, :, w], {"origin": "lower"}))
    for n, (label, picture, heat, extra) in enumerate(views):
      shown = _overlay(fig.add_subplot(grid[0, n]), picture, heat, label, **extra)
    fig.colorbar(_colour_scale(shown), ax=fig.axes[:3], fraction=0.02, pad=0.02)
    if slice_attention is not None:
      weights = np.asarray(slice_attention, np.float32)
      where = np.arange(len(weights)) if slice_indices is None else np.asarray(slice_indices)
      ax = fig.add_subplot(grid[1, :])
      step = where[1] - where[0] if len(where) > 1 else 1
      ax.bar(where, weights, width=0.8 * step, color="tab:blue")
      ax.set_xlabel(f"{slice_axis} slice")
      ax.set_ylabel("attention")
  else:
    raise ValueError(f"heat maps are 2-D or 3-D, got shape {heatmap.shape}")
  fig.suptitle(title, fontsize=11)
  return fig


def write_overlay(path: str, image: np.ndarray, heatmap: np.ndarray, title: str,
                  **kwargs) -> None:
  """Saves `overlay_figure` (``kwargs``: its slice-attention arguments) as a PNG at ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  overlay_figure(image, heatmap, title, **kwargs).savefig(path, dpi=_DPI)


# --------------------------------------------------------------------------------------------
# medjax.infer.predict --saliency


class PredictHook:
  """`medjax.infer.predict.SaliencyHook`: one overlay PNG per classified input.

  Writes ``<output>/saliency/<input>.png`` (the input's name, made file-safe) explaining the
  class predictions.csv reports: the arg-max, or for a binary run the positive class where its
  probability reaches ``threshold``; multi-label runs: the most probable label.

  Attributes:
    method: ``"gradcam"`` or ``"gradient"``.
    layer: Grad-CAM layer (None: the last conv block).
    threshold: the binary decision threshold predict was given.
    smoothgrad_samples, sigma, seed: see `Explainer.gradient`.
  """

  def __init__(self, method: str, *, layer: str | None = None, threshold: float = 0.5,
               smoothgrad_samples: int = 0, sigma: float = SMOOTHGRAD_SIGMA, seed: int = 0):
    if method not in METHODS:
      raise ValueError(f"saliency method {method!r}; expected one of {', '.join(METHODS)}")
    self.method, self.layer, self.threshold = method, layer, threshold
    self.options = ({"smoothgrad_samples": smoothgrad_samples, "sigma": sigma, "seed": seed}
                    if method == "gradient" else {})
    self._explainer: Explainer | None = None  # built on the first batch, compiled once
    self._taken: set[str] = set()

  @property
  def settings(self) -> dict[str, Any]:
    """What predict records in ``predict.json``: the method and its options."""
    return {"method": self.method, "layer": self.layer, **self.options}

  def _chosen(self, trained: TrainedModel, probs: np.ndarray) -> np.ndarray:
    if trained.task.name == "classification" and probs.shape[1] == 2:
      return (probs[:, 1] >= self.threshold).astype(np.int32)
    return np.argmax(probs, axis=1).astype(np.int32)

  def __call__(self, trained: TrainedModel, images: np.ndarray, inputs: Sequence[Any],
               probs: np.ndarray, output_dir: str) -> None:
    if self._explainer is None or self._explainer.model is not trained.model:
      self._explainer = Explainer.from_trained(trained, self.layer)
    # The run's eval transforms, applied as predict applied them to get ``probs``.
    source = ArraySource(images, np.zeros(len(images), np.int64), name="saliency")
    batch = next(pipeline.eval_batches(source, trained.eval_transforms(),
                                       global_batch_size=len(images)))
    chosen = self._chosen(trained, np.asarray(probs))
    x = jnp.asarray(batch["image"], jnp.float32)
    result = jax.device_get(self._explainer(self.method, x, chosen, **self.options))
    maps = np.asarray(result.maps)
    if maps.shape[1:] != images.shape[1:-1]:  # eval transforms that resize: back to the record
      maps = np.asarray(jax.image.resize(maps, (len(maps), *images.shape[1:-1]), "linear"))
    for i, item in enumerate(inputs):
      k = int(chosen[i])
      attention = {}
      if result.slice_attention is not None:
        weights = np.asarray(result.slice_attention[i])
        attention = dict(slice_attention=weights,
                         slice_indices=np.arange(len(weights)) * trained.model.slice_stride,
                         slice_axis=trained.model.slice_axis)
      path = os.path.join(output_dir, "saliency", output_stem(item.name, self._taken) + ".png")
      # The title names the class and its probability, nothing else: no patient field.
      write_overlay(path, images[i], maps[i], f"{trained.class_names[k]}  p = {probs[i, k]:.3f}",
                    **attention)


def predict_hook(method: str, **options) -> PredictHook | None:
  """The hook for ``predict --saliency=<method>``: None for ``"none"``, else a `PredictHook`."""
  return None if method == "none" else PredictHook(method, **options)
