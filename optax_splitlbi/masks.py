"""Reading the sparse structure out of a SplitLBI state (paper Sec. 4: W on supp Γ).

All functions are pure, work inside and outside ``jit``, and accept either a
:class:`~optax_splitlbi.SplitLBIState` or any optimizer state that contains
one (e.g. the state of ``optax.chain(..., splitlbi(...))`` or of
``optax.inject_hyperparams(splitlbi)(...)``).

Layouts: a *full* mask has the parameter's shape; a *keepdims* (per-group)
array has size-1 dims at a group penalty's ``reduce_axes`` and the full shape
for lasso leaves (one "group" per weight). Unpenalized leaves are ``None``.

Groups that span leaves (:class:`~optax_splitlbi.ChannelGroups`): every member
of a class holds the class's decision in its own keepdims layout, the same in
all members (a group is in supp Γ when Γ is nonzero in any member's slice).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_splitlbi.prox import penalty_norms, shared_norms, slice_sq_norms
from optax_splitlbi.penalties import LeafPenalty, class_slices, member_axis, path_str
from optax_splitlbi.transform import SplitLBIState, params_paths, params_structure, recompute_gamma

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
  treedef = params_structure(state)
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
  treedef = params_structure(state)
  pens, vs = treedef.flatten_up_to(state.penalty), treedef.flatten_up_to(state.v)
  return [(path_str(p), i, pe, tuple(v.shape))
          for i, (p, pe, v) in enumerate(zip(params_paths(state), pens, vs)) if pe is not None]


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


def _leaves_and_layouts(state: SplitLBIState, tree: Any) -> tuple[list, list]:
  treedef = params_structure(state)
  return _flatten_like(treedef, tree), treedef.flatten_up_to(state.penalty)


def _unflatten(state: SplitLBIState, leaves: list) -> Any:
  return params_structure(state).unflatten(leaves)


def group_norms_list(state: SplitLBIState, tree: Any, *, slices_only: bool = False) -> list:
  """‖x_g‖₂ per group of every penalized leaf (keepdims; ``|x|`` for lasso), leaf order.

  A member of a cross-leaf class gets the norm over the whole class (all
  members and norm-only slices, as the prox sees it), the same in every
  member; with ``slices_only`` only the members' own slices count.
  """
  xs, layouts = _leaves_and_layouts(state, tree)
  out = [None if pe is None else penalty_norms(jnp.asarray(x), pe)
         for x, pe in zip(xs, layouts)]
  for slices in class_slices(layouts).values():
    used = [(i, a) for i, a, shrunk in slices if shrunk or not slices_only]
    norms = shared_norms([slice_sq_norms(jnp.asarray(xs[i]), a) for i, a in used])
    for i, a, shrunk in slices:
      if shrunk:
        out[i] = jnp.reshape(norms, out[i].shape)
  return out


def group_support(opt_state: Any) -> Any:
  """1[Γ_g ≠ 0] per group, keepdims layout (per entry for lasso); ``None`` elsewhere.

  A cross-leaf group is in the support when Γ is nonzero in any member's slice.
  """
  state = find_state(opt_state)
  norms = group_norms_list(state, gamma(opt_state), slices_only=True)
  return _unflatten(state, [None if n is None else n > 0 for n in norms])


def support(opt_state: Any) -> Any:
  """Boolean masks 1[Γ ≠ 0], full parameter shape; ``None`` for unpenalized leaves.

  For a group penalty a group's decision (Γ_g ≠ 0) is broadcast over all of
  its entries (for a cross-leaf group, over its slice in every member). The
  masks plug into :func:`optax_splitlbi.apply_masks`,
  :func:`optax_splitlbi.masked_updates` and :func:`optax_splitlbi.slim`.
  """
  state = find_state(opt_state)
  return map_penalized(lambda pe, v, g: jnp.broadcast_to(g, v.shape), state,
                       group_support(opt_state))


@dataclasses.dataclass(frozen=True)
class Unit:
  """A set of groups decided together: a penalized leaf, or a cross-leaf class.

  Attributes:
    name: the leaf's path, or the class's name.
    leaves: the leaf indices (a class: its members, in leaf order).
    num_groups: groups in the unit (a lasso leaf: its entries).
    group_size: weights one group removes (over all members of a class).
    kind: ``"lasso"``, ``"group"`` or ``"class"``.
  """

  name: str
  leaves: tuple[int, ...]
  num_groups: int
  group_size: int
  kind: str


def units(opt_state: Any) -> list[Unit]:
  """The units of the importance order and of per-layer budgets, in leaf order."""
  leaves = penalized_leaves(opt_state)
  out, seen = [], set()
  for name, i, pe, shape in leaves:
    if pe.shared is None:
      n = math.prod(shape) // (pe.group_size if pe.kind == "group" else 1)
      out.append(Unit(name, (i,), n, pe.group_size, pe.kind))
    elif pe.shared not in seen:
      seen.add(pe.shared)
      members = [(j, s) for _, j, q, s in leaves if q.shared == pe.shared]
      size = shape[member_axis(pe)]
      out.append(Unit(pe.shared, tuple(j for j, _ in members), size,
                      sum(math.prod(s) for _, s in members) // size, "class"))
  return out


def sparse_params(params: Any, opt_state: Any) -> Any:
  """W* = W ∘ 1[Γ ≠ 0], the paper's sparse model (W projected on supp Γ).

  Unpenalized leaves (biases, norm scales) are returned unchanged.
  """
  masks = support(opt_state)
  return jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
                      params, masks, is_leaf=lambda x: x is None)

