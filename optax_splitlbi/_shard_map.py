"""Group norms of groups split by ``jax.shard_map`` (``splitlbi(param_specs=...)``).

Inside ``shard_map`` each device sees its shard of a kernel. When a kernel is
split along an axis that its groups reduce over, a group's squared norm is the
``psum`` of the shards' over the mesh axes named at those axes of the
``PartitionSpec``. Under ``jax.jit`` GSPMD reduces globally and none of this
is needed.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from optax_splitlbi.penalties import LeafPenalty, member_axis, path_str


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, jax.sharding.PartitionSpec)


def _mesh_axes(spec: Any, pe: LeafPenalty) -> list:
  """The mesh axis names that split the reduced axes of a group layout."""
  names = []
  if pe is None or pe.kind != "group" or spec is None:
    return names
  for a in pe.reduce_axes:
    entry = spec[a] if a < len(spec) else None
    names += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
  return names


def group_split_axes(param_specs: Any, params: Any, layouts: list) -> list[tuple]:
  """Per leaf, the shard_map mesh axes that split its groups (``()`` if none).

  Raises:
    ValueError: naming the leaf, when ``update`` is not inside ``shard_map``
      over those axes, or when the local group sizes do not add up to the
      state's (``init`` was called on local instead of global params).
  """
  if param_specs is None:
    return [()] * len(layouts)
  treedef = jax.tree.structure(params)
  specs = treedef.flatten_up_to(jax.tree.broadcast(param_specs, params, is_leaf=_is_spec))
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  out = []
  for (path, w), spec, pe in zip(with_path, specs, layouts):
    _check_cross_leaf(path_str(path), spec, pe)
    names = _mesh_axes(spec, pe)
    if names:
      try:
        split = math.prod(jax.lax.axis_size(n) for n in names)
      except NameError:
        raise ValueError(f"splitlbi: param_specs splits the groups of {path_str(path)} over "
                         f"mesh axes {names}, but update is not inside jax.shard_map over "
                         "them; under jax.jit leave param_specs=None.") from None
      local = math.prod(w.shape[a] for a in pe.reduce_axes)
      if pe.shared is None and local * split != pe.group_size:
        raise ValueError(f"splitlbi: {path_str(path)}: a local group has {local} entries, "
                         f"split {split} ways, but the state's group size is "
                         f"{pe.group_size}; call init on the global params and pass their "
                         "specs.")
    out.append(tuple(names))
  return out


def _check_cross_leaf(name: str, spec: Any, pe: LeafPenalty) -> None:
  """Inside shard_map a cross-leaf class's members may split only their reduced axes:
  the class's vector of group norms is summed over leaves and must not be split."""
  if pe is None or spec is None:
    return
  split = [a for a in range(len(spec)) if spec[a] is not None]
  if pe.shared is not None and member_axis(pe) in split:
    raise ValueError(f"splitlbi: param_specs splits {name} along axis {member_axis(pe)}, "
                     f"which indexes the groups of class {pe.shared!r}; inside shard_map "
                     "only the other axes of a class member may be split (under jax.jit "
                     "any sharding works).")
  if pe.norm_of and split:
    raise ValueError(f"splitlbi: param_specs splits {name}, whose slices enter the norms "
                     f"of {[c for c, _ in pe.norm_of]}; inside shard_map such a leaf must "
                     "not be split (under jax.jit any sharding works).")
