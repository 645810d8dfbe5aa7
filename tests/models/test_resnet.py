import jax
import jax.numpy as jnp
import pytest

from medjax import registry
from medjax.models import resnet  # noqa: F401


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 16, 16, 16, 1), (2, 32, 32, 3)])
def test_output_shapes_2d_and_3d(shape):
  model = registry.lookup("models.resnet_tiny")(num_classes=3)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
  logits, feats = model.apply(variables, jnp.ones(shape), return_features=True)
  assert logits.shape == (2, 3)
  assert feats.shape == (2, 16)
  kernel = variables["params"]["ConvNormAct_0"]["Conv_0"]["kernel"]
  assert kernel.shape == (3,) * (len(shape) - 2) + (shape[-1], 8)


@pytest.mark.parametrize("name,expected", [
    # torchvision's counts (11,689,512 for ResNet-18) less the 7x7x3 stem and 1000-way head, plus
    # a 3x3x1 stem and a 2-way head. MONAI's are higher by the biases of its shortcut convs.
    ("resnet18", 11_168_706), ("resnet34", 21_276_866), ("resnet50", 23_503_298)])
def test_parameter_counts_2d(name, expected):
  model = registry.lookup(f"models.{name}")(num_classes=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1))))
  assert _count(shapes["params"]) == expected


def test_imagenet_stem_and_rank_check():
  model = registry.lookup("models.resnet_tiny")(num_classes=2, stem_kernel=7, stem_stride=2,
                                                  stem_pool=True)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
  assert model.apply(v, jnp.zeros((1, 32, 32, 1))).shape == (1, 2)
  with pytest.raises(ValueError, match="expects"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 1)))


def test_batchnorm_statistics_update_in_train_mode():
  model = registry.lookup("models.resnet_tiny")(num_classes=2)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((4, 16, 16, 1)))
  _, upd = model.apply(v, jnp.ones((4, 16, 16, 1)) * 3.0, train=True, mutable=["batch_stats"])
  before = jax.tree.leaves(v["batch_stats"])
  after = jax.tree.leaves(upd["batch_stats"])
  assert any(not jnp.allclose(a, b) for a, b in zip(before, after))
