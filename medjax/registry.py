"""Name → constructor registry with call syntax, e.g. ``lookup("models.resnet18(num_classes=2)")``.

Modelled on big_vision's ``pp/registry.py``: one global table, filled by decorators at import time
through the explicit imports in each package's ``__init__``; registering a name twice is an error.
"""

from __future__ import annotations

import ast
import functools
from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator that files ``fn`` under ``name`` (e.g. ``"models.resnet18"``).

  Raises:
    KeyError: when ``name`` is already registered.
  """

  def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
    if name in _REGISTRY:
      raise KeyError(f"{name!r} is already registered (by {_REGISTRY[name]!r})")
    _REGISTRY[name] = fn
    return fn

  return decorator


def names(prefix: str = "") -> list[str]:
  """All registered names that start with ``prefix``, sorted."""
  return sorted(n for n in _REGISTRY if n.startswith(prefix))


def lookup(spec: str, prefix: str = "") -> Callable[..., Any]:
  """Returns the registered callable for ``spec``, with any literal arguments bound.

  Args:
    spec: ``"name"`` or ``"name(arg, key=value)"``; arguments must be Python literals.
    prefix: prepended to the name (``lookup("resnet18", "models.")``).

  Returns:
    The callable itself, or a ``functools.partial`` when the spec has arguments.

  Raises:
    KeyError: unknown name; the message lists the known ones under ``prefix``.
    ValueError: the spec does not parse as ``name(literal args)``.
  """
  try:
    expr = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse registry spec {spec!r}: {e}") from None
  args: list[Any] = []
  kwargs: dict[str, Any] = {}
  if isinstance(expr, ast.Call):
    try:
      args = [ast.literal_eval(a) for a in expr.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
    except ValueError:
      raise ValueError(f"registry spec {spec!r}: arguments must be literals") from None
    expr = expr.func
  name = ast.unparse(expr)
  full = prefix + name
  if full not in _REGISTRY:
    raise KeyError(f"unknown {prefix.rstrip('.') or 'name'} {name!r}; known: {names(prefix)}")
  fn = _REGISTRY[full]
  return functools.partial(fn, *args, **kwargs) if (args or kwargs) else fn
