import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.train import losses


def _logits_from_probs(p_fg):
  """Two-class logits whose softmax is exactly ``[1 - p, p]``."""
  p = np.asarray(p_fg, np.float64)
  return jnp.asarray(np.log(np.stack([1 - p, p], -1)), jnp.float32)


def _dice(i, p, g, smooth=1e-5):
  return (2 * i + smooth) / (p + g + smooth)


# Two 1-D samples of 4 voxels: sample 0 holds a 2-voxel object, sample 1 is empty.
P_FG = [[0.9, 0.6, 0.2, 0.1], [0.2, 0.1, 0.1, 0.1]]
LABELS = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
DICE_0 = _dice(1.5, 1.8, 2.0)  # intersect 0.9 + 0.6, predicted 1.8, truth 2
DICE_1 = _dice(0.0, 0.5, 0.0)  # empty: only the smooth term, ~2e-5


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("labels_shape", ["plain", "channel"])
def test_dice_is_0_for_perfect_and_1_for_wrong_logits(include_background, labels_shape):
  labels = jax.random.randint(jax.random.PRNGKey(0), (2, 6, 5, 4), 0, 3)
  perfect = 30.0 * jax.nn.one_hot(labels, 3)
  wrong = 30.0 * jax.nn.one_hot((labels + 1) % 3, 3)
  if labels_shape == "channel":
    labels = labels[..., None]
  loss = functools.partial(losses.soft_dice_loss, labels=labels, num_classes=3,
                           include_background=include_background)
  assert loss(perfect) == pytest.approx(0.0, abs=1e-5)
  assert loss(wrong) == pytest.approx(1.0, abs=1e-5)


def test_per_sample_and_batch_dice_match_hand_computation():
  logits = _logits_from_probs(P_FG)
  per_sample = losses.soft_dice_loss(logits, LABELS, 2)
  batch = losses.soft_dice_loss(logits, LABELS, 2, batch_dice=True)
  np.testing.assert_allclose(per_sample, 1 - (DICE_0 + DICE_1) / 2, rtol=1e-5)
  np.testing.assert_allclose(batch, 1 - _dice(1.5, 2.3, 2.0), rtol=1e-5)
  assert batch < per_sample - 0.2  # the empty sample no longer counts as a Dice of ~0
  assert losses.soft_dice_loss(logits, LABELS) == per_sample  # num_classes read from the logits


def test_background_included_averages_both_classes():
  logits = _logits_from_probs(P_FG[:1])
  # Background probabilities [0.1, 0.4, 0.8, 0.9] against truth [0, 0, 1, 1].
  dice_bg = _dice(0.8 + 0.9, 2.2, 2.0)
  got = losses.soft_dice_loss(logits, LABELS[:1], 2, include_background=True)
  np.testing.assert_allclose(got, 1 - (dice_bg + DICE_0) / 2, rtol=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_mask_zero_removes_a_sample(batch_dice):
  logits = _logits_from_probs(P_FG)
  mask = jnp.array([1.0, 0.0])
  loss = lambda lg: losses.soft_dice_loss(lg, LABELS, 2, batch_dice=batch_dice, mask=mask)
  np.testing.assert_allclose(loss(logits), 1 - DICE_0, rtol=1e-5)
  other = logits.at[1].set(jax.random.normal(jax.random.PRNGKey(1), logits.shape[1:]))
  np.testing.assert_allclose(loss(other), loss(logits), rtol=1e-6)
  grad = jax.grad(loss)(logits)
  assert jnp.all(grad[1] == 0) and jnp.any(grad[0] != 0)


def test_cross_entropy_equals_optax_and_weights_samples():
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4, 4))
  labels = jax.random.randint(jax.random.PRNGKey(1), (3, 5, 4), 0, 4)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), jnp.mean(ce), rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels[..., None]), jnp.mean(ce),
                             rtol=1e-6)
  mask = jnp.array([1.0, 0.0, 1.0])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, mask),
                             jnp.mean(ce[jnp.array([0, 2])]), rtol=1e-6)


def test_dice_ce_is_the_weighted_sum():
  logits = _logits_from_probs(P_FG)
  got = losses.dice_ce_loss(logits, LABELS, 2, weight_ce=0.5, weight_dice=2.0, batch_dice=True)
  want = (0.5 * losses.cross_entropy(logits, LABELS)
          + 2.0 * losses.soft_dice_loss(logits, LABELS, 2, batch_dice=True))
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("margin", [0.0, 30.0])
def test_gradients_finite_without_foreground(batch_dice, margin):
  labels = jnp.zeros((2, 4, 4), jnp.int32)
  logits = margin * jax.nn.one_hot(labels, 3)  # 0: uniform; 30: confidently background
  loss = lambda lg: losses.dice_ce_loss(lg, labels, 3, batch_dice=batch_dice)
  value, grad = jax.value_and_grad(loss)(logits)
  assert jnp.isfinite(value) and jnp.all(jnp.isfinite(grad))


def test_shape_checks():
  logits = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="do not fit"):
    losses.cross_entropy(logits, jnp.zeros((2, 4, 5), jnp.int32))
  with pytest.raises(ValueError, match="num_classes"):
    losses.soft_dice_loss(logits, jnp.zeros((2, 4, 4), jnp.int32), 2)
  with pytest.raises(ValueError, match="per sample"):
    losses.cross_entropy(logits, jnp.zeros((2, 4, 4), jnp.int32), mask=jnp.ones((2, 4)))


def test_deep_supervision_weights_follow_nnunet_v2():
  np.testing.assert_allclose(losses.deep_supervision_weights(4), [1 / 1.75, 0.5 / 1.75,
                                                                  0.25 / 1.75, 0.0])
  np.testing.assert_allclose(losses.deep_supervision_weights(1), [1.0])


def test_downsample_labels_is_nearest_exact():
  labels = jnp.arange(16).reshape(1, 4, 4)
  # Factor 2 takes offset 1 of each 2-block (PyTorch nearest-exact), as nnU-Net v2.
  np.testing.assert_array_equal(losses.downsample_labels(labels, (2, 2)), [[[5, 7], [13, 15]]])
  np.testing.assert_array_equal(losses.downsample_labels(labels[..., None], (2, 4))[..., 0],
                                [[[4, 5, 6, 7], [12, 13, 14, 15]]])
  # Non-divisible 5 → 3 (stride 2, as a SAME strided conv): offsets 1, 3, then clamped to 4.
  np.testing.assert_array_equal(losses.downsample_labels(jnp.arange(5)[None], (3,)), [[1, 3, 4]])
  with pytest.raises(ValueError, match="no integer stride"):
    losses.downsample_labels(labels, (3, 4))


def test_deep_supervision_loss_on_a_hand_example():
  labels = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4)
  outputs = [jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 1, 1, 2))]
  seen = []

  def mean_label(logits, lab):  # the loss reads only the labels it was given
    seen.append(lab.shape)
    assert lab.shape == logits.shape[:-1]
    return jnp.mean(lab)

  # Means: full 7.5; half [[5, 7], [13, 15]] → 10; quarter (weight 0) never evaluated.
  got = losses.deep_supervision_loss(outputs, labels, mean_label)
  np.testing.assert_allclose(got, (7.5 * 1 + 10 * 0.5) / 1.5, rtol=1e-6)
  assert seen == [(1, 4, 4), (1, 2, 2)]
  got = losses.deep_supervision_loss(outputs, labels, mean_label, weights=[1, 1, 1])
  np.testing.assert_allclose(got, (7.5 + 10 + 10) / 3, rtol=1e-6)  # quarter: voxel [2, 2]
  assert losses.deep_supervision_loss(outputs[0], labels, mean_label) == 7.5
  with pytest.raises(ValueError, match="weights"):
    losses.deep_supervision_loss(outputs, labels, mean_label, weights=[1, 1])


def test_deep_supervision_loss_jits_with_dice_ce():
  labels = jax.random.randint(jax.random.PRNGKey(0), (2, 8, 8), 0, 3)
  outputs = [jax.random.normal(jax.random.PRNGKey(i), (2, 8 >> i, 8 >> i, 3)) for i in range(3)]
  loss_fn = functools.partial(losses.dice_ce_loss, num_classes=3, mask=jnp.array([1.0, 1.0]))
  fn = jax.jit(lambda o, y: losses.deep_supervision_loss(o, y, loss_fn))
  w = losses.deep_supervision_weights(3)
  want = sum(w[i] * loss_fn(outputs[i], losses.downsample_labels(labels, outputs[i].shape[1:3]))
             for i in range(2))
  np.testing.assert_allclose(fn(outputs, labels), want, rtol=1e-5)
