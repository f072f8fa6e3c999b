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

A cross-leaf class (:class:`~optax_splitlbi.ChannelGroups`) is one unit: its
groups are ranked once, by the norm over all members, with the weights of all
members as their size, and every member gets the same decision.

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


def _check_tiebreak(tiebreak: str, params: Any) -> None:
  if tiebreak not in ("v", "w"):
    raise ValueError(f"tiebreak must be 'v' or 'w', got {tiebreak!r}.")
  if tiebreak == "w" and params is None:
    raise ValueError("tiebreak='w' needs params.")


def _keys(opt_state, params, tiebreak):
  """Per leaf (leaf order, ``None`` if unpenalized), in keepdims layout: the primary
  int32 key (entry step, or 0) and the secondary float key (the tie-break norm,
  over the whole class for a member of a cross-leaf class)."""
  state = masks_lib.find_state(opt_state)
  layouts = masks_lib.params_structure(state).flatten_up_to(state.penalty)
  norms = masks_lib.group_norms_list(state, state.v if tiebreak == "v" else params)
  thresholds = iter(state.threshold)
  secondary = []
  for pe, n in zip(layouts, norms):
    if pe is None:
      secondary.append(None)
    elif tiebreak == "v":  # ‖V_g‖/t (t = 0: the raw norm)
      t = next(thresholds)
      secondary.append(n * jnp.where(t > 0, 1.0 / jnp.where(t > 0, t, 1.0), 1.0))
    else:  # the RMS ‖W_g‖/√d
      next(thresholds)
      secondary.append(n / math.sqrt(pe.group_size))
  if state.entry is None:
    primary = [None if n is None else jnp.zeros(n.shape, jnp.int32) for n in secondary]
  else:
    entries = masks_lib.params_structure(state).flatten_up_to(state.entry)
    primary = [None if pe is None else jnp.where(e >= 0, e, _NEVER).astype(jnp.int32)
               for pe, e in zip(layouts, entries)]
  return state, primary, secondary


def _per_unit(state, keys: list) -> list:
  """Every unit's key vector (its first leaf's, flat): one entry per group."""
  return [keys[u.leaves[0]].reshape(-1) for u in masks_lib.units(state)]


def _to_leaves(state, per_unit: list, like: list) -> Any:
  """Scatters per-unit vectors to every member leaf in its keepdims layout (``like``)."""
  out = [None] * len(like)
  for u, x in zip(masks_lib.units(state), per_unit):
    for i in u.leaves:
      out[i] = x.reshape(like[i].shape)
  return masks_lib.params_structure(state).unflatten(out)


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
  for k in primary:
    if k is not None:
      k_max = jnp.maximum(k_max, jnp.max(jnp.where(k == _NEVER, 0, k), initial=0))
  k_max = k_max.astype(jnp.float32)

  def score(k, n):
    s = n / (1 + n)
    return jnp.where(k == _NEVER, s, (k_max + 1 - k.astype(jnp.float32)) + s)

  return masks_lib.params_structure(state).unflatten(
      [None if k is None else score(k, n) for k, n in zip(primary, norms)])


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
  prim, sec = _per_unit(state, primary), _per_unit(state, norms)
  if scope == "layer":
    ranks = [_ranks(p, s) for p, s in zip(prim, sec)]
  else:
    flat = _ranks(jnp.concatenate(prim or [jnp.zeros(0, jnp.int32)]),
                  jnp.concatenate(sec or [jnp.zeros(0)]))
    ranks = _split(flat, [p.size for p in prim])
  return _to_leaves(state, ranks, primary)


def _split(flat: jax.Array, sizes: list) -> list:
  """``flat`` cut into consecutive pieces of ``sizes``."""
  out, start = [], 0
  for n in sizes:
    out.append(flat[start:start + n])
    start += n
  return out


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
      ``scope="layer"``, a mapping ``{name: fraction}`` over every penalized
      leaf outside cross-leaf classes and every class (by its name) for
      per-layer densities.
    scope: ``"layer"`` (each penalized leaf, or each cross-leaf class as a
      whole, keeps ``target`` of itself) or
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
    names = [u.name for u in masks_lib.units(opt_state)]
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
  prim, sec = _per_unit(state, primary), _per_unit(state, norms)
  sizes = [jnp.full(p.shape, u.group_size, jnp.int32)
           for p, u in zip(prim, masks_lib.units(state))]
  if scope == "layer":
    targets = target if target.ndim else [target] * len(prim)
    keep = [_keep_prefix(p, s, z, t) for p, s, z, t in zip(prim, sec, sizes, targets)]
  elif prim:
    keep = _split(_keep_prefix(jnp.concatenate(prim), jnp.concatenate(sec),
                               jnp.concatenate(sizes), target), [p.size for p in prim])
  else:
    keep = []
  return masks_lib.map_penalized(lambda pe, v, k: jnp.broadcast_to(k, v.shape), state,
                                 _to_leaves(state, keep, primary))
