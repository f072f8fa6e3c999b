"""The regularization path: entry order of groups and pruning to any sparsity.

SplitLBI's Γ follows an inverse-scale-space path: starting from Γ₀ = 0, the
groups (filters, neurons, weights) that matter most for the loss enter
supp(Γ) first (paper Sec. 3, Fig. 8). With ``splitlbi(..., record_path=True)``
the state keeps, per group, the first step k at which Γ_k became nonzero there
(``state.entry``, −1 if never). This module turns that into an importance order
and into masks at any requested density, so one run yields nested subnetworks
at every sparsity (the official toolbox's ``update_prune_order`` / prune-by-order).

Importance order (most important first), lexicographic:

1. entry step k ascending; groups that never entered come after all that did;
2. ties (same k, or never entered) by a norm, descending:
   ``tiebreak="v"``: ‖V_g‖₂ / t_g, V's progress towards the prox threshold
   t_g (λ, or λ√d for normalized penalties; ≥ 1 exactly on supp Γ, so it is
   comparable across layers with different λ); ``"w"``: ‖W_g‖₂/√d_g, the RMS
   of the group's weights (comparable across group sizes);
3. remaining ties by position (layer order, then row-major group index).

Without ``record_path`` only step 2 applies: the order is by ‖V_g‖/t_g (or
W's RMS), whose groups above 1 are exactly supp Γ; it approximates the entry
order (V moves monotonically only while W keeps its sign pattern).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_splitlbi import masks as masks_lib
from optax_splitlbi.prox import penalty_norms
from optax_splitlbi.penalties import LeafPenalty

_NEVER = jnp.iinfo(jnp.int32).max


def entry_steps(opt_state: Any) -> Any:
  """The step at which each group first entered supp(Γ) (−1: not yet).

  Returns:
    int32 pytree in keepdims layout (full shape for lasso), ``None`` at
    unpenalized leaves.

  Raises:
    ValueError: if the optimizer was made without ``record_path=True``.
  """
  state = masks_lib.find_state(opt_state)
  if state.entry is None:
    raise ValueError("entry_steps: the state has no entry record; create the optimizer "
                     "with splitlbi(..., record_path=True).")
  return masks_lib.map_penalized(lambda pe, v, e: e, state, state.entry)


def entered_by(opt_state: Any, step) -> Any:
  """Full-shape masks of the groups that had entered supp(Γ) at or before ``step``.

  With a recorded path, ``entered_by(state, k)`` is the union of supp(Γ_j),
  j ≤ k: the subnetwork "at step k" of one run (groups rarely leave supp Γ).
  ``None`` at unpenalized leaves.
  """
  state = masks_lib.find_state(opt_state)
  ent = entry_steps(state)
  return masks_lib.map_penalized(
      lambda pe, v, e: jnp.broadcast_to((e >= 0) & (e <= step), v.shape), state, ent)


def _tiebreak_norms(pe: LeafPenalty, v, w, t, tiebreak: str) -> jax.Array:
  """Keepdims-layout secondary key (larger = more important)."""
  if tiebreak == "v":
    x = v
    scale = jnp.where(t > 0, 1.0 / jnp.where(t > 0, t, 1.0), 1.0)  # t = 0: raw norm
  else:
    x, scale = w, 1.0 / math.sqrt(pe.group_size)
  return penalty_norms(jnp.asarray(x), pe) * scale


def _check_tiebreak(tiebreak: str, params: Any) -> None:
  if tiebreak not in ("v", "w"):
    raise ValueError(f"tiebreak must be 'v' or 'w', got {tiebreak!r}.")
  if tiebreak == "w" and params is None:
    raise ValueError("tiebreak='w' needs params.")


def _keys(opt_state, params, tiebreak):
  """Per penalized leaf trees: primary int32 key (entry step), secondary float key."""
  state = masks_lib.find_state(opt_state)
  w_tree = params if params is not None else state.v
  norms = masks_lib.map_penalized(
      lambda pe, v, w, t: _tiebreak_norms(pe, v, w, t, tiebreak), state, w_tree,
      masks_lib.thresholds(state))
  if state.entry is None:
    primary = masks_lib.map_penalized(
        lambda pe, v, n: jnp.zeros(n.shape, jnp.int32), state, norms)
  else:
    primary = masks_lib.map_penalized(
        lambda pe, v, e: jnp.where(e >= 0, e, _NEVER).astype(jnp.int32), state, state.entry)
  return state, primary, norms


def _order(primary: jax.Array, secondary: jax.Array) -> jax.Array:
  """Indices sorted by (primary ascending, secondary descending, index ascending)."""
  index = jnp.arange(primary.size, dtype=jnp.int32)
  return jnp.lexsort((index, -secondary, primary))  # the last key is the primary one


def _ranks(primary: jax.Array, secondary: jax.Array) -> jax.Array:
  """0-based rank under (primary ascending, secondary descending, index), flat."""
  order = _order(primary, secondary)
  return jnp.zeros(order.shape, jnp.int32).at[order].set(
      jnp.arange(order.size, dtype=jnp.int32))


def importance_scores(opt_state: Any, params: Optional[Any] = None, *,
                      tiebreak: str = "v") -> Any:
  """A float score per group, higher = more important (for plots and inspection).

  ``score = (K + 1 − k) + s`` for a group that entered at step k (K = the
  state's step count, or the latest entry step if larger) and ``score = s``
  for one that never entered, with the tie-break norm n (module docstring)
  squashed to s = n/(1 + n) ∈ [0, 1).
  Entered groups thus always outrank the others and earlier entry wins; float32
  limits how finely s breaks ties after many steps, so use
  :func:`importance_ranks` for an exact order.

  Args:
    opt_state: a SplitLBI state (or one containing it).
    params: W, needed for ``tiebreak="w"``.
    tiebreak: ``"v"`` or ``"w"`` (module docstring).

  Returns:
    float32 pytree, keepdims layout, ``None`` at unpenalized leaves.
  """
  _check_tiebreak(tiebreak, params)
  return _importance_scores(opt_state, params, tiebreak)


@functools.partial(jax.jit, static_argnums=(2,))
def _importance_scores(opt_state, params, tiebreak):
  state, primary, norms = _keys(opt_state, params, tiebreak)
  k_max = state.count
  for k in jax.tree.leaves(primary):
    k_max = jnp.maximum(k_max, jnp.max(jnp.where(k == _NEVER, 0, k), initial=0))
  k_max = k_max.astype(jnp.float32)

  def score(pe, v, k, n):
    s = n / (1 + n)
    return jnp.where(k == _NEVER, s, (k_max + 1 - k.astype(jnp.float32)) + s)

  return masks_lib.map_penalized(score, state, primary, norms)


def importance_ranks(opt_state: Any, params: Optional[Any] = None, *,
                     scope: str = "global", tiebreak: str = "v") -> Any:
  """The exact importance rank of every group (0 = most important).

  Args:
    opt_state: a SplitLBI state (or one containing it).
    params: W, needed for ``tiebreak="w"``.
    scope: ``"layer"`` (ranks 0..G−1 within each leaf) or ``"global"``
      (one order over the groups of all penalized leaves).
    tiebreak: ``"v"`` or ``"w"`` (module docstring).

  Returns:
    int32 pytree in keepdims layout, ``None`` at unpenalized leaves.
  """
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  _check_tiebreak(tiebreak, params)
  return _importance_ranks(opt_state, params, scope, tiebreak)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _importance_ranks(opt_state, params, scope, tiebreak):
  state, primary, norms = _keys(opt_state, params, tiebreak)
  prim = jax.tree.leaves(primary)
  sec = jax.tree.leaves(norms)
  if scope == "layer":
    ranks = [_ranks(p.reshape(-1), s.reshape(-1)).reshape(p.shape)
             for p, s in zip(prim, sec)]
  else:
    flat = _ranks(jnp.concatenate([p.reshape(-1) for p in prim] or [jnp.zeros(0, jnp.int32)]),
                  jnp.concatenate([s.reshape(-1) for s in sec] or [jnp.zeros(0)]))
    ranks, start = [], 0
    for p in prim:
      ranks.append(flat[start:start + p.size].reshape(p.shape))
      start += p.size
  return _unflatten_penalized(state, ranks)


def _unflatten_penalized(state, leaves: list) -> Any:
  it = iter(leaves)
  return masks_lib.map_penalized(lambda pe, v: next(it), state)


def _keep_prefix(primary, secondary, sizes, target) -> jax.Array:
  """Flat bool: the prefix of the importance order whose size is nearest target·N."""
  order = _order(primary, secondary)
  sizes_sorted = sizes[order]
  total = jnp.sum(sizes).astype(jnp.float32)
  kept = jnp.concatenate([jnp.zeros(1, jnp.float32),
                          jnp.cumsum(sizes_sorted).astype(jnp.float32)])
  # Nearest to target·N; argmin takes the first, i.e. the smaller, on ties.
  p = jnp.argmin(jnp.abs(kept - target * total))
  keep_sorted = jnp.arange(order.size) < p
  return jnp.zeros(order.shape, bool).at[order].set(keep_sorted)


def prune_to_sparsity(params: Optional[Any], opt_state: Any, target, *,
                      scope: str = "layer", tiebreak: str = "v") -> Any:
  """Masks keeping the most important fraction ``target`` of the penalized weights.

  ``target`` is the *density* kept (the paper's "sparsity": fraction of
  nonzero weights), e.g. 0.1 keeps 10 %. Whole groups are kept or pruned, in
  the importance order of the module docstring: the kept set is the prefix of
  that order whose weight count is nearest to target·N (N = weights in scope;
  on a tie the smaller prefix). Per layer this keeps exactly
  round(target·G) of the G groups (halves round down); globally the kept
  count is within half a group of target·N. Masks for increasing targets are
  nested, so one run gives a family of subnetworks.

  Args:
    params: W (used for ``tiebreak="w"``; may be ``None`` for ``"v"``).
    opt_state: a SplitLBI state (or one containing it); with
      ``record_path=True`` for the entry order, otherwise the order is by the
      tie-break norm alone.
    target: fraction in [0, 1] of weights to keep (may be traced), or, with
      ``scope="layer"``, a mapping ``{path: fraction}`` over every penalized
      layer (as in :func:`sparsity_report`) for per-layer densities.
    scope: ``"layer"`` (each penalized leaf keeps ``target`` of itself) or
      ``"global"`` (one budget over all penalized leaves, so layers end up with
      different densities).
    tiebreak: ``"v"`` or ``"w"`` (module docstring).

  Returns:
    Boolean masks, full parameter shapes, ``None`` at unpenalized leaves
    (ready for :func:`optax_splitlbi.apply_masks` / :func:`masked_updates`).

  Raises:
    ValueError: for a concrete ``target`` outside [0, 1], a target mapping
      that does not name exactly the penalized layers, or a bad ``scope``.
  """
  if scope not in ("layer", "global"):
    raise ValueError(f"prune_to_sparsity: scope must be 'layer' or 'global', got {scope!r}.")
  if isinstance(target, Mapping):
    if scope != "layer":
      raise ValueError("prune_to_sparsity: a per-layer target mapping needs scope='layer'.")
    names = [name for name, _, _, _ in masks_lib.penalized_leaves(opt_state)]
    missing = [n for n in names if n not in target]
    unknown = [n for n in target if n not in names]
    if missing or unknown:
      raise ValueError(f"prune_to_sparsity: the target mapping must have exactly the "
                       f"penalized layers {names}; missing {missing}, unknown {unknown}.")
    for n in names:
      _check_fraction(target[n], f"target[{n!r}]")
    target = jnp.stack([jnp.asarray(target[n], jnp.float32) for n in names]) if names else (
        jnp.zeros(0, jnp.float32))
  else:
    _check_fraction(target, "target")
  _check_tiebreak(tiebreak, params)
  return _prune_to_sparsity(params, opt_state, jnp.asarray(target, jnp.float32), scope, tiebreak)


def _check_fraction(x, name: str) -> None:
  if isinstance(x, jax.core.Tracer):
    return
  if not 0.0 <= float(x) <= 1.0:  # also rejects NaN
    raise ValueError(f"prune_to_sparsity: {name} must be a fraction in [0, 1], got {x!r}.")


@functools.partial(jax.jit, static_argnums=(3, 4))
def _prune_to_sparsity(params, opt_state, target, scope, tiebreak):
  state, primary, norms = _keys(opt_state, params, tiebreak)
  info = masks_lib.penalized_leaves(state)
  prim = [p.reshape(-1) for p in jax.tree.leaves(primary)]
  sec = [s.reshape(-1) for s in jax.tree.leaves(norms)]
  sizes = [jnp.full(p.shape, pe.group_size, jnp.int32) for p, (_, _, pe, _) in zip(prim, info)]
  if scope == "layer":
    targets = target if target.ndim else [target] * len(prim)
    keep = [_keep_prefix(p, s, z, t) for p, s, z, t in zip(prim, sec, sizes, targets)]
  elif prim:
    flat = _keep_prefix(jnp.concatenate(prim), jnp.concatenate(sec), jnp.concatenate(sizes),
                        target)
    keep, start = [], 0
    for p in prim:
      keep.append(flat[start:start + p.size])
      start += p.size
  else:
    keep = []
  group_shapes = [p.shape for p in jax.tree.leaves(primary)]
  full = [jnp.broadcast_to(k.reshape(gs), shape)
          for k, gs, (_, _, _, shape) in zip(keep, group_shapes, info)]
  return _unflatten_penalized(state, full)
