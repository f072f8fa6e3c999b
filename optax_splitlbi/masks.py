"""Reading the sparse structure out of a SplitLBI state (paper Sec. 4: W on supp Γ).

All functions are pure, work inside and outside ``jit``, and accept either a
:class:`~optax_splitlbi.SplitLBIState` or any optimizer state that contains
one (e.g. the state of ``optax.chain(..., splitlbi(...))`` or of
``optax.inject_hyperparams(splitlbi)(...)``).

Layouts: a *full* mask has the parameter's shape; a *keepdims* (per-group)
array has size-1 dims at a group penalty's ``reduce_axes`` and the full shape
for lasso leaves (one "group" per weight). Unpenalized leaves are ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_splitlbi.prox import group_norms
from optax_splitlbi.penalties import LeafPenalty, path_str
from optax_splitlbi.transform import SplitLBIState, recompute_gamma

_INJECT_STATES = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


def _is_state(x: Any) -> bool:
  return isinstance(x, SplitLBIState)


def _is_inject(x: Any) -> bool:
  return isinstance(x, _INJECT_STATES)


def find_state(opt_state: Any) -> SplitLBIState:
  """Returns the (single) :class:`SplitLBIState` inside ``opt_state``.

  Args:
    opt_state: a ``SplitLBIState`` or any pytree (chain, inject_hyperparams,
      multi_transform state, ...) holding exactly one.

  Raises:
    ValueError: if there is none, or more than one.
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]
  if len(found) != 1:
    raise ValueError(f"Expected exactly one SplitLBIState in the optimizer state, "
                     f"found {len(found)}.")
  return found[0]


def injected_hyperparams(opt_state: Any) -> dict[str, Any]:
  """The hyperparameters of the ``optax.inject_hyperparams`` states wrapping the SplitLBI.

  Innermost values win; ``{}`` when there is no such wrapper.
  """
  state = find_state(opt_state)
  out: dict[str, Any] = {}
  node = opt_state
  while True:
    injects = [x for x in jax.tree.leaves(node, is_leaf=_is_inject) if _is_inject(x)]
    owner = [x for x in injects if any(
        s is state for s in jax.tree.leaves(x.inner_state, is_leaf=_is_state))]
    if not owner:
      return out
    out.update(owner[0].hyperparams)
    node = owner[0].inner_state


def _masked(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def map_penalized(fn: Callable[..., Any], state: SplitLBIState, *trees: Any) -> Any:
  """Maps ``fn(penalty, v, *leaves)`` over penalized leaves; ``None`` elsewhere.

  Args:
    fn: called per penalized leaf with its :class:`LeafPenalty`, its V and the
      matching leaves of ``trees``.
    state: a :class:`SplitLBIState`.
    *trees: pytrees with the params' structure (e.g. params, Γ); any value
      (``None``, ``MaskedNode``) may stand at unpenalized leaves.

  Returns:
    A pytree with the params' structure, ``None`` at unpenalized leaves.
  """
  _, treedef = jax.tree.flatten(state.momentum)
  pens = treedef.flatten_up_to(state.penalty)
  vs = treedef.flatten_up_to(state.v)
  others = [_flatten_like(treedef, t) for t in trees]
  out = [None if pe is None else fn(pe, v, *(o[i] for o in others))
         for i, (pe, v) in enumerate(zip(pens, vs))]
  return treedef.unflatten(out)


def _flatten_like(treedef, tree: Any) -> list:
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"A tree does not match the parameters' structure: {e}") from e


def penalized_leaves(opt_state: Any) -> list[tuple[str, int, LeafPenalty, tuple[int, ...]]]:
  """``(path, index, penalty, shape)`` of every penalized leaf, in leaf order.

  ``path`` is the readable name (``"Conv_0/kernel"``), ``index`` the leaf's
  position in ``jax.tree.leaves(params)``.
  """
  state = find_state(opt_state)
  with_path, treedef = jax.tree_util.tree_flatten_with_path(state.momentum)
  pens = treedef.flatten_up_to(state.penalty)
  return [(path_str(p), i, pe, tuple(x.shape))
          for i, ((p, x), pe) in enumerate(zip(with_path, pens)) if pe is not None]


def thresholds(opt_state: Any) -> Any:
  """The prox threshold t of every penalized leaf (float32 scalars), ``None`` elsewhere."""
  state = find_state(opt_state)
  it = iter(state.threshold)
  return map_penalized(lambda pe, v: next(it), state)


def gamma(opt_state: Any) -> Any:
  """Γ of every penalized leaf (``None`` elsewhere).

  Reads ``state.gamma``, or, for a state made with ``store_gamma=False``,
  recomputes Γ = κ·Prox_t(V) (paper eq. 4c) with the κ and thresholds t of the
  last update, which the state holds: the Γ that update used.
  """
  state = find_state(opt_state)
  stored = state.gamma if state.gamma is not None else recompute_gamma(state)
  return map_penalized(lambda pe, v, g: g, state, stored)


def _group_nonzero(pe: LeafPenalty, g: jax.Array) -> jax.Array:
  if pe.kind == "lasso":
    return g != 0
  return group_norms(g, pe.reduce_axes) > 0


def group_support(opt_state: Any) -> Any:
  """1[Γ_g ≠ 0] per group, keepdims layout (per entry for lasso); ``None`` elsewhere."""
  state = find_state(opt_state)
  return map_penalized(lambda pe, v, g: _group_nonzero(pe, g), state, gamma(opt_state))


def support(opt_state: Any) -> Any:
  """Boolean masks 1[Γ ≠ 0], full parameter shape; ``None`` for unpenalized leaves.

  For a group penalty a group's decision (Γ_g ≠ 0) is broadcast over all of
  its entries. The masks plug into :func:`optax_splitlbi.apply_masks` and
  :func:`optax_splitlbi.masked_updates`.
  """
  state = find_state(opt_state)
  return map_penalized(
      lambda pe, v, g: jnp.broadcast_to(_group_nonzero(pe, g), g.shape),
      state, gamma(opt_state))


def sparse_params(params: Any, opt_state: Any) -> Any:
  """W* = W ∘ 1[Γ ≠ 0], the paper's sparse model (W projected on supp Γ).

  Unpenalized leaves (biases, norm scales) are returned unchanged.
  """
  masks = support(opt_state)
  return jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
                      params, masks, is_leaf=lambda x: x is None)

