"""The unsupervised fusion losses on hand cases, and the fusion task's loss and metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from medjax.metrics import fusion as fusion_metrics
from medjax.metrics.fusion import _ssim_single
from medjax.train import fusion_losses, tasks


def _images(seed=0, shape=(2, 24, 24)):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0, 1, shape).astype(np.float32)
  b = np.clip(a[:, ::-1] * 0.5 + rng.uniform(0, 0.5, shape), 0, 1).astype(np.float32)
  return a, b


def test_identical_sources_fused_to_themselves_cost_nothing():
  a, _ = _images()
  for loss in (fusion_losses.ssim_loss, fusion_losses.gradient_loss,
               fusion_losses.intensity_loss):
    np.testing.assert_allclose(loss(a, a, a), 0.0, atol=1e-5)


def test_each_term_on_a_hand_case():
  a, b = _images()
  # SSIM: the metric's formula (scikit-image's window) at data range 1, averaged over A and B.
  ssim = [0.5 * (_ssim_single(f, x, 1.0) + _ssim_single(f, y, 1.0))
          for f, x, y in zip(b, a, b)]
  np.testing.assert_allclose(fusion_losses.ssim_loss(b, a, b), 1.0 - np.array(ssim), rtol=1e-4)
  # Intensity: the brighter source costs nothing, the mean costs half the mean |A - B|.
  brighter = np.maximum(a, b)
  np.testing.assert_allclose(fusion_losses.intensity_loss(brighter, a, b), 0.0, atol=1e-7)
  np.testing.assert_allclose(fusion_losses.intensity_loss((a + b) / 2, a, b),
                             np.abs(a - b).mean((1, 2)) / 2, rtol=1e-5)
  # Gradient: a unit vertical step has Sobel |gx| + |gy| = 4 on the two columns beside it; a flat
  # fused image misses all of it, the step itself none.
  step = np.zeros((1, 8, 8), np.float32)
  step[:, :, 4:] = 1.0
  magnitude = np.asarray(fusion_losses.sobel_magnitude(step))
  assert (magnitude[:, :, 3:5] == 4.0).all() and magnitude.sum() == 4.0 * 2 * 8
  flat = np.zeros_like(step)
  np.testing.assert_allclose(fusion_losses.gradient_loss(flat, step, flat), 1.0, rtol=1e-6)
  np.testing.assert_allclose(fusion_losses.gradient_loss(step, step, flat), 0.0, atol=1e-7)


def test_the_fusion_task_weights_its_terms_and_scores_with_the_fusion_metrics():
  a, b = _images(shape=(2, 32, 32))
  sources = np.stack([a, b], -1)
  fused = jnp.asarray((a + b)[..., None] / 2)
  task = tasks.get_task("fusion", ssim_weight=2.0, gradient_weight=0.0, intensity_weight=3.0)
  expected = 2.0 * fusion_losses.ssim_loss(fused, a, b) + 3.0 * fusion_losses.intensity_loss(
      fused, a, b)
  np.testing.assert_allclose(task.loss_fn(fused, {"image": jnp.asarray(sources)}), expected,
                             rtol=1e-6)
  labels = np.round(sources * 255).astype(np.uint8)
  metrics = task.metrics_fn(labels, np.asarray(task.predict_fn(fused)))
  assert tuple(metrics) == fusion_metrics.METRICS == task.metric_names(1)
  qabf = np.mean([fusion_metrics.qabf(np.round(255 * f[..., 0]), s[..., 0], s[..., 1])
                  for f, s in zip(np.asarray(fused), labels)])
  assert metrics["Qabf"] == pytest.approx(qabf, rel=1e-9)
