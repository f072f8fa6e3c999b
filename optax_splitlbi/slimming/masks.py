"""Masks as ``slim`` reads them: one full-shape bool array per variable leaf.

The optimizer's toolkit gives masks in the structure of the params (``support``,
``entered_by``, ``prune_to_sparsity``: full shape; ``group_support``: keepdims per
group; ``None``: unmasked); a model's variables may hold more (Linen's
``batch_stats``, NNX's ``rest``) and NNX paths end in ``/value``. This module maps
the one onto the other, checking that every mask names a variable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def leaf_paths(tree: Any) -> list[str]:
  """Path strings (``a/b/c``) of the leaves of ``tree``."""
  return [jax.tree_util.keystr(p, simple=True, separator="/")
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def strip_value(name: str) -> str:
  """NNX states end paths in ``/value`` (the Variable's field); masks may not."""
  return name[:-len("/value")] if name.endswith("/value") else name


def _mask_prefix(variables: Any, masks: Any) -> str:
  """Masks may match the whole variables or (Linen / NNX style) ``variables["params"]``."""
  if isinstance(variables, Mapping) and "params" in variables:
    if not (isinstance(masks, Mapping) and "params" in masks):
      return "params/"
  return ""


def leaf_masks(variables: Any, masks: Any) -> dict[int, np.ndarray]:
  """Variable leaf index → full-shape bool mask (True: weight kept).

  Masks are full-shape (``support``, ``entered_by``, ``prune_to_sparsity``) or
  per-group keepdims (``group_support``); ``None`` leaves are unmasked.

  Raises:
    ValueError: naming the mask leaf that is not a variable or whose shape does
      not broadcast to the variable's.
  """
  names = leaf_paths(variables)
  index = {strip_value(n): i for i, n in enumerate(names)}
  leaves = jax.tree.leaves(variables)
  prefix = _mask_prefix(variables, masks)
  out = {}
  for path, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]:
    name = strip_value(prefix + jax.tree_util.keystr(path, simple=True, separator="/"))
    if name not in index and not any(n.startswith(name + "/") for n in index):
      raise ValueError(f"masks: leaf {name!r} is not a variable of the model; the masks "
                       f"must have the params' tree structure (variables: {names[:6]}...).")
    if m is None:
      continue
    if name not in index:
      raise ValueError(f"masks: {name!r} is a subtree of the variables, not a leaf; give "
                       "its leaves masks (or None).")
    shape = np.shape(leaves[index[name]])
    m = np.asarray(m)
    if m.ndim != len(shape) or any(a not in (1, b) for a, b in zip(m.shape, shape)):
      raise ValueError(f"masks: mask {name!r} has shape {m.shape}, which neither equals nor "
                       f"broadcasts (keepdims) to the variable's shape {shape}.")
    out[index[name]] = np.broadcast_to(m != 0, shape)
  return out


def masked_leaves(leaves: Sequence[Any], masks: Mapping[int, np.ndarray]) -> list[np.ndarray]:
  """The variable leaves (numpy) with their masked entries set to zero."""
  return [np.where(masks[i], np.asarray(x), np.zeros((), np.asarray(x).dtype))
          if i in masks else np.asarray(x) for i, x in enumerate(leaves)]
