"""Reading the sparse structure out of a SplitLBI state (paper Sec. 4: W on supp Γ).

All functions are pure, work inside and outside ``jit``, and accept either a
:class:`~optax_splitlbi.SplitLBIState` or any optimizer state that contains
one (e.g. the state of ``optax.chain(..., splitlbi(...))`` or of
``optax.inject_hyperparams(splitlbi)``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_splitlbi import prox as prox_lib
from optax_splitlbi.transform import SplitLBIState


def _is_state(x: Any) -> bool:
  return isinstance(x, SplitLBIState)


def find_state(opt_state: Any) -> SplitLBIState:
  """Returns the (single) :class:`SplitLBIState` inside ``opt_state``.

  Raises:
    ValueError: if there is none, or more than one.
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]
  if len(found) != 1:
    raise ValueError(f"Expected exactly one SplitLBIState in the optimizer state, "
                     f"found {len(found)}.")
  return found[0]


def _masked(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def map_penalized(fn, state: SplitLBIState, *trees: Any) -> Any:
  """Maps ``fn(penalty, v, *leaves)`` over penalized leaves; ``None`` elsewhere.

  ``trees`` share the params' structure (e.g. params, Γ). The result has the
  params' structure with ``None`` at unpenalized leaves.
  """
  leaves, treedef = jax.tree.flatten(state.momentum)
  pens = treedef.flatten_up_to(state.penalty)
  vs = treedef.flatten_up_to(state.v)
  others = [treedef.flatten_up_to(t) for t in trees]
  out = [None if pe is None else fn(pe, v, *(o[i] for o in others))
         for i, (pe, v) in enumerate(zip(pens, vs))]
  return treedef.unflatten(out)


def gamma(opt_state: Any) -> Any:
  """Γ of every penalized leaf (``None`` elsewhere).

  Reads ``state.gamma``, or recomputes Γ = κ·Prox_{λΩ}(V) when the state was
  made with ``store_gamma=False``.
  """
  state = find_state(opt_state)
  if state.gamma is not None:
    return map_penalized(lambda pe, v, g: g, state, state.gamma)
  kappa, lam = state.hyper
  if kappa is None or lam is None:
    raise ValueError("gamma: this state was made with store_gamma=False and traced "
                     "kappa/lam, so Γ cannot be recomputed; use store_gamma=True.")
  return map_penalized(lambda pe, v: kappa * prox_lib.prox(v, pe, lam), state)


def _broadcast_support(pe, g):
  if pe.kind == "lasso":
    return g != 0
  nonzero_group = prox_lib.group_norms(g, pe.reduce_axes) > 0
  return jnp.broadcast_to(nonzero_group, g.shape)


def support(opt_state: Any) -> Any:
  """Boolean masks 1[Γ ≠ 0], full parameter shape; ``None`` for unpenalized leaves.

  For a group penalty a group's decision (Γ_g ≠ 0) is broadcast over all of
  its entries.
  """
  state = find_state(opt_state)
  return map_penalized(lambda pe, v, g: _broadcast_support(pe, g), state, gamma(state))


def sparse_params(params: Any, opt_state: Any) -> Any:
  """W* = W ∘ 1[Γ ≠ 0], the paper's sparse model (W projected on supp Γ).

  Unpenalized leaves (biases, norm scales) are returned unchanged.
  """
  masks = support(opt_state)
  return jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
                      params, masks, is_leaf=lambda x: x is None)
