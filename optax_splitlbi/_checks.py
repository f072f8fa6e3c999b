"""Argument checks of :func:`optax_splitlbi.splitlbi`: each error names the argument or leaf."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_splitlbi.penalties import path_str

_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "learning_rate": (lambda x: x >= 0, ">= 0"),
    "kappa": (lambda x: x > 0, "> 0"),
    "nu": (lambda x: x > 0, "> 0"),
    "lam": (lambda x: x >= 0, ">= 0"),
    "momentum": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "weight_decay": (lambda x: x >= 0, ">= 0"),
}


def _number(name: str, value: Any) -> None:
  """A finite number within its range; traced values and callables pass."""
  if isinstance(value, jax.core.Tracer) or (callable(value) and name == "learning_rate"):
    return
  if isinstance(value, (str, bytes)) or callable(value):
    raise ValueError(f"splitlbi: {name} must be a number"
                     f"{' or a schedule (callable)' if name == 'learning_rate' else ''}, "
                     f"got {value!r}.")
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"splitlbi: {name} must be a number, got {value!r}.") from None
  ok, need = _RULES[name]
  if not math.isfinite(x) or not ok(x):
    raise ValueError(f"splitlbi: {name} must be {need}, got {value!r}.")


def hyperparameters(*, coupling: str, **values: Any) -> None:
  """Checks the numeric hyperparameters and ``coupling`` at construction."""
  for name, value in values.items():
    _number(name, value)
  if coupling not in ("outside", "momentum"):
    raise ValueError(f"splitlbi: coupling must be 'outside' or 'momentum', got {coupling!r}.")


def transformation(name: str, transform: Any) -> None:
  """``transform`` (argument ``name``) is ``None`` or an optax transformation."""
  if transform is not None and not (hasattr(transform, "init") and hasattr(transform, "update")):
    raise ValueError(f"splitlbi: {name} must be an optax GradientTransformation "
                     f"(e.g. optax.scale_by_adam()), got {transform!r}.")


def direction(transform: Any, *, nesterov: bool) -> None:
  """``direction`` is an optax transformation and excludes Nesterov."""
  transformation("direction", transform)
  if transform is not None and nesterov:
    raise ValueError("splitlbi: with a direction, nesterov must be False (the direction "
                     "replaces the momentum).")


def _paths(params: Any) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def penalized_dtypes(params: Any, resolved: list) -> None:
  """Penalized leaves must be real floating point (no int, bool or complex)."""
  for name, p, r in zip(_paths(params), jax.tree.leaves(params), resolved):
    if r is not None and not jnp.issubdtype(p.dtype, jnp.floating):
      raise ValueError(f"splitlbi: params leaf {name!r} has dtype {p.dtype} but carries a "
                       f"{r.layout.kind} penalty; penalized leaves must be real floating "
                       "point (give it the penalty None).")


def _same_tree(name: str, tree: Any, params: Any) -> list:
  """``tree``'s leaves matched to the params' (structure and shapes checked)."""
  treedef = jax.tree.structure(params)
  try:
    leaves = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"splitlbi: {name} and params have different tree structures: "
                     f"{e}") from None
  for path, x, p in zip(_paths(params), leaves, jax.tree.leaves(params)):
    if hasattr(x, "shape") and tuple(x.shape) != tuple(p.shape):
      raise ValueError(f"splitlbi: leaf {path!r} has shape {tuple(x.shape)} in {name} but "
                       f"{tuple(p.shape)} in params.")
  return leaves


def update_inputs(updates: Any, state: Any, params: Any) -> None:
  """``update(grads, state, params)``: params given, all three trees aligned."""
  if params is None:
    raise ValueError("splitlbi: update needs the current parameters: call "
                     "update(grads, state, params) (params=None was given).")
  _same_tree("grads (updates)", updates, params)
  for field in ("momentum", "v", "gamma"):
    if getattr(state, field) is not None:
      _same_tree(f"state.{field}", getattr(state, field), params)


def same_layout(resolved: list, layouts: list, params: Any) -> None:
  """The penalty resolves to the group layout the state was made with."""
  for path, r, pe in zip(_paths(params), resolved, layouts):
    now = None if r is None else _layout_key(r.layout)
    then = None if pe is None else _layout_key(pe)
    if now != then:
      raise ValueError(f"splitlbi: leaf {path!r}: the state was made with penalty layout "
                       f"{then} (kind, reduced axes, class, norm-only classes) but the "
                       f"penalty now gives {now}; call init again or use the same penalty.")


def _layout_key(pe) -> tuple:
  return (pe.kind, pe.reduce_axes, pe.shared, pe.norm_of)
