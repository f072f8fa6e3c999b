"""Retraining subnetworks: masked updates and rewinding (paper Sec. 4.4, App. D, E).

A subnetwork is a pytree of boolean masks with the params' structure (from
:func:`optax_splitlbi.support`, :func:`optax_splitlbi.prune_to_sparsity`, or
hand-made): ``True`` keeps an entry, ``False`` prunes it; a ``None`` leaf keeps
the whole leaf (biases, norm scales); a mask may also be any shape that
broadcasts to its leaf (e.g. a per-filter keepdims mask, or a Python bool),
and the masks tree may be a prefix of the params tree (``{"Dense_0": None,
"Conv_0": {...}}``: a ``None`` or a bool there covers the whole subtree).

- Fine-tuning (App. D): ``optax.chain(inner, masked_updates(masks))`` from
  ``apply_masks(W_T, masks)``.
- Lottery retraining (Fig. 5, Frankle & Carbin 2019): the same from the
  rewound ``apply_masks(W_0, masks)`` (or W_k for "rewinding" to epoch k).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from optax_splitlbi.penalties import path_str

Masks = Union[Any, Callable[[optax.Params], Any]]


def _is_none(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _flat_masks(masks: Any, tree: Any, who: str):
  """(key paths and leaves of ``tree``, its treedef, one mask or None per leaf), checked."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  # ``masks`` may be a prefix of ``tree``: a mask (or None) stands for a whole subtree.
  m_leaves, m_def = jax.tree.flatten(masks, is_leaf=_is_none)
  try:
    subtrees = m_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{who}: the masks tree does not match the params tree: {e}") from e
  flat = [m for m, sub in zip(m_leaves, subtrees) for _ in jax.tree.leaves(sub)]
  out = []
  for (p, x), m in zip(with_path, flat):
    if _is_none(m):
      out.append(None)
      continue
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_:
      raise ValueError(f"{who}: the mask of leaf {path_str(p)!r} must be boolean, got "
                       f"{m.dtype}.")
    try:
      ok = jnp.broadcast_shapes(m.shape, jnp.shape(x)) == tuple(jnp.shape(x))
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"{who}: the mask of leaf {path_str(p)!r} has shape {m.shape}, "
                       f"which does not broadcast to the leaf's shape {jnp.shape(x)}.")
    out.append(m)
  return with_path, treedef, out


def apply_masks(params: Any, masks: Any) -> Any:
  """W ∘ M: zeroes the pruned entries (``mask == False``) of every leaf.

  Use it to rewind: ``apply_masks(init_params, masks)`` is the lottery ticket
  (the initialization restricted to the subnetwork), ``apply_masks(W_k,
  masks)`` rewinds to step k.

  Args:
    params: a parameter pytree.
    masks: boolean masks with the params' structure; ``None`` leaves keep the
      leaf, any broadcastable shape is accepted.

  Returns:
    The masked parameters (same structure, shapes and dtypes).

  Raises:
    ValueError: naming the leaf, if a mask is not boolean or does not fit.
  """
  with_path, treedef, flat = _flat_masks(masks, params, "apply_masks")
  return treedef.unflatten([
      x if m is None else jnp.where(m, x, jnp.zeros_like(x))
      for (_, x), m in zip(with_path, flat)])


class MaskedUpdatesState(NamedTuple):
  """State of :func:`masked_updates`: the masks (``MaskedNode`` = keep the leaf)."""

  masks: Any


def masked_updates(masks: Masks, project: bool = True) -> optax.GradientTransformationExtraArgs:
  """Keeps pruned entries exactly zero under any inner optimizer.

  Chain it *last*, after the inner optimizer (momentum, Adam, weight decay,
  clipping, ...)::

      opt = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, 0.9),
                        masked_updates(masks))

  For a kept entry the update passes unchanged; for a pruned one it is
  replaced by ``−W`` (``project=True`` and ``params`` given to ``update``), so
  W + u = 0 exactly after every step even if W was not zero at start, or by 0
  (otherwise; start from :func:`apply_masks` then). The inner optimizer's own
  state (momentum, Adam moments) may hold values at pruned entries; they
  never reach W.

  Args:
    masks: boolean masks with the params' structure (``None`` leaves keep the
      leaf, broadcastable shapes allowed), or a callable ``params -> masks``
      evaluated at ``init``. Stored in the state, so a jitted step takes
      them as an argument (not as compile-time constants) and they can be
      swapped with ``state._replace(masks=...)`` for iterative pruning.
    project: with ``params``, set pruned entries to exactly 0 (see above).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """

  def init_fn(params):
    m = masks(params) if callable(masks) else masks
    with_path, treedef, flat = _flat_masks(m, params, "masked_updates")
    # A fresh buffer per leaf, so donating the state never deletes the user's masks.
    return MaskedUpdatesState(treedef.unflatten([
        optax.MaskedNode() if x is None else jnp.array(x, copy=True) for x in flat]))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    us, treedef = jax.tree.flatten(updates)
    ms = treedef.flatten_up_to(state.masks)
    ps = (treedef.flatten_up_to(params) if (project and params is not None)
          else [None] * len(us))
    out = []
    for u, m, p in zip(us, ms, ps):
      if _is_none(m):
        out.append(u)
      elif p is None:
        out.append(jnp.where(m, u, jnp.zeros_like(u)))
      else:
        out.append(jnp.where(m, u, (-p).astype(u.dtype)))
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
