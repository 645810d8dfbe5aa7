import functools

import pytest

from medjax import registry


def test_lookup_with_call_syntax():
  registry.register("test_ops.scale")(lambda x, factor=1: x * factor)
  fn = registry.lookup("scale(factor=3)", "test_ops.")
  assert isinstance(fn, functools.partial)
  assert fn(2) == 6
  assert registry.lookup("scale", "test_ops.")(2) == 2


def test_duplicate_and_unknown_names_raise():
  registry.register("test_ops.once")(lambda: 1)
  with pytest.raises(KeyError, match="already registered"):
    registry.register("test_ops.once")(lambda: 2)
  with pytest.raises(KeyError, match="unknown test_ops 'nope'.*once"):
    registry.lookup("nope", "test_ops.")


def test_non_literal_arguments_rejected():
  registry.register("test_ops.ident")(lambda x=0: x)
  with pytest.raises(ValueError, match="literals"):
    registry.lookup("ident(x=open)", "test_ops.")
