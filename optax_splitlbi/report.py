"""Sparsity reports, per-group norms and the coupling residue (paper Sec. 4, Figs. 5, 8).

The paper's "sparsity" of a layer is the fraction of its weights (or filters)
that are nonzero in Γ, i.e. the *density* of supp(Γ); this module reports both
counts and densities per penalized leaf and in total, as plain dicts that can
be logged, plus per-group norms ‖W_g‖, ‖V_g‖, ‖Γ_g‖ for path plots and the
coupling residue ‖W − Γ‖²/(2ν) (the official toolbox's distance of W to Γ).

All functions are pure and work inside and outside ``jit``. Outside ``jit``
the report holds Python ``int`` / ``float``; under ``jit`` the data-dependent
entries are 0-d arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_static

from optax_splitlbi import masks as masks_lib
from optax_splitlbi import retrain as retrain_lib
from optax_splitlbi.prox import penalty_norms
from optax_splitlbi.penalties import LeafPenalty, path_str

@register_static
class Kind(str):
  """A layer's penalty kind, ``"group"`` or ``"lasso"``: a ``str`` that is a
  leaf-less pytree node, so a report can be returned from a jitted function."""

  __slots__ = ()


@register_static
class Names(tuple):
  """The member paths of a cross-leaf class: a tuple that is a leaf-less pytree node."""

  __slots__ = ()


_LAYER_KEYS = ("weights", "nonzero_weights", "weight_density",
               "groups", "nonzero_groups", "group_density")


def _num_groups(pe: LeafPenalty, shape: tuple[int, ...]) -> int:
  return math.prod(n for a, n in enumerate(shape) if a not in pe.reduce_axes)


def _density(nonzero, total: int):
  return nonzero / total if total else jnp.zeros([], jnp.float32)


def _to_python(report: dict) -> dict:
  """Converts 0-d arrays to Python numbers unless any of them is traced."""
  leaves = jax.tree.leaves(report)
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    return report

  def py(x):  # keeps the dicts' insertion order (jax.tree.map would sort keys)
    if isinstance(x, dict):
      return {k: py(v) for k, v in x.items()}
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      return x.item()
    return x

  return py(report)


def sparsity_report(opt_state: Any, params: Optional[Any] = None, *,
                    masks: Optional[Any] = None) -> dict:
  """Per-layer and total sparsity of supp(Γ), keyed by readable leaf paths.

  For a penalized leaf with penalty groups g (one per weight for lasso)::

      nonzero_groups  = #{g : Γ_g ≠ 0}
      nonzero_weights = Σ_{g : Γ_g ≠ 0} |g|       (entries of supp Γ, broadcast per group)
      weight_density  = nonzero_weights / weights  (the paper's "sparsity")
      group_density   = nonzero_groups / groups

  Args:
    opt_state: a SplitLBI state or any state containing one.
    params: optional parameters; only used to count ``total["params"]`` (and
      checked against the state's structure). Without them the momentum
      buffer's shapes (one per parameter leaf) are counted.
    masks: optional boolean masks (e.g. from :func:`prune_to_sparsity` or
      :func:`entered_by`; ``None`` leaves, broadcastable shapes and prefix
      trees as in :func:`apply_masks`) to report on instead of supp Γ:
      ``nonzero_weights`` then counts the kept entries and ``nonzero_groups``
      the groups with at least one kept entry.

  Returns:
    ``{"layers": {path: {"kind", "weights", "nonzero_weights", "weight_density",
    "groups", "nonzero_groups", "group_density"}}, with cross-leaf classes "classes": {name: {"kind",
    "members", "weights", "nonzero_weights", "groups", "nonzero_groups",
    "group_density"}}, "total": {same counts and densities over all penalized
    leaves, "params": number of parameters in every leaf, penalized or not}}``.
    ``kind`` is ``"group"`` or ``"lasso"`` (``"class"`` for a cross-leaf
    class, whose ``groups`` are its channels, counted once in the total); for
    lasso ``groups == weights``. A density over zero weights is 0.
  """
  state = masks_lib.find_state(opt_state)
  info = masks_lib.penalized_leaves(state)
  shapes = _shape_tree(state, params)
  if masks is None:
    gsup = jax.tree.leaves(masks_lib.group_support(opt_state))
  else:
    _, _, flat = retrain_lib._flat_masks(masks, shapes, "sparsity_report")
    full = [jnp.ones(shape, bool) if flat[i] is None else jnp.broadcast_to(flat[i], shape)
            for _, i, _, shape in info]
    gsup = [jnp.any(f, axis=pe.reduce_axes, keepdims=True) for f, (_, _, pe, _) in
            zip(full, info)]
  layers, kept_groups = {}, {}
  for j, (name, i, pe, shape) in enumerate(info):
    weights = math.prod(shape)
    groups = _num_groups(pe, shape)
    group_size = weights // groups if groups else 0
    kept_groups[i] = gsup[j]
    nonzero_groups = jnp.sum(gsup[j], dtype=jnp.int32)
    if masks is None:
      nonzero_weights = nonzero_groups * group_size
    else:
      nonzero_weights = jnp.sum(full[j], dtype=jnp.int32)
    layers[name] = {
        "kind": Kind(pe.kind),
        "weights": weights,
        "nonzero_weights": nonzero_weights,
        "weight_density": _density(nonzero_weights, weights),
        "groups": groups,
        "nonzero_groups": nonzero_groups,
        "group_density": _density(nonzero_groups, groups),
    }
  classes = _class_report(state, layers, kept_groups)
  units = [layers[n] for n, _, pe, _ in info if pe.shared is None] + list(classes.values())
  total = {}
  for k in ("weights", "nonzero_weights"):
    total[k] = sum((layer[k] for layer in layers.values()), 0)
  for k in ("groups", "nonzero_groups"):  # a cross-leaf class's groups count once
    total[k] = sum((unit[k] for unit in units), 0)
  total["weight_density"] = _density(total["nonzero_weights"], total["weights"])
  total["group_density"] = _density(total["nonzero_groups"], total["groups"])
  total = {k: total[k] for k in _LAYER_KEYS}
  total["params"] = int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(shapes)))
  out = {"layers": layers, "classes": classes, "total": total} if classes else {
      "layers": layers, "total": total}
  return _to_python(out)


def _shape_tree(state, params: Optional[Any]) -> Any:
  """The params' shapes as ``ShapeDtypeStruct`` leaves: from ``params`` (checked), else
  from the momentum buffers (or, with a direction, their static shapes)."""
  treedef = masks_lib.params_structure(state)
  leaves = masks_lib._flatten_like(treedef, state.momentum if params is None else params)
  return treedef.unflatten([jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) for x in leaves])


def _class_report(state, layers: dict, kept_groups: dict) -> dict:
  """Per cross-leaf class: its channels in supp Γ (or kept by the masks) and weights."""
  out = {}
  names = {i: name for name, i, _, _ in masks_lib.penalized_leaves(state)}
  for unit in masks_lib.units(state):
    if unit.kind != "class":
      continue
    kept = functools.reduce(jnp.logical_or, [kept_groups[i].reshape(-1) for i in unit.leaves])
    members = [names[i] for i in unit.leaves]
    nonzero = jnp.sum(kept, dtype=jnp.int32)
    out[unit.name] = {
        "kind": Kind("class"), "members": Names(members),
        "weights": sum(layers[m]["weights"] for m in members),
        "nonzero_weights": sum(layers[m]["nonzero_weights"] for m in members),
        "groups": unit.num_groups, "nonzero_groups": nonzero,
        "group_density": _density(nonzero, unit.num_groups)}
  return out


def format_report(report: dict) -> str:
  """A readable, aligned table of a :func:`sparsity_report` (one row per layer + total)."""
  header = ("layer", "kind", "nonzero/weights", "density", "nonzero/groups", "density")

  def row(name, kind, r):
    return (name, kind, f"{int(r['nonzero_weights'])}/{int(r['weights'])}",
            f"{float(r['weight_density']):.2%}",
            f"{int(r['nonzero_groups'])}/{int(r['groups'])}",
            f"{float(r['group_density']):.2%}")

  rows = [row(n, r["kind"], r) for n, r in report["layers"].items()]
  for n, r in report.get("classes", {}).items():
    r = dict(r, weight_density=r["nonzero_weights"] / max(r["weights"], 1))
    rows.append(row(f"{n} ({len(r['members'])} leaves)", "class", r))
  rows.append(row("total", "", report["total"]))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def fmt(r):
    cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
    cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
    return "  ".join(cells).rstrip()

  rule = "-" * len(fmt(header))
  lines = [fmt(header), rule] + [fmt(r) for r in rows[:-1]] + [rule, fmt(rows[-1])]
  lines.append(f"parameters (all leaves): {int(report['total']['params'])}")
  return "\n".join(lines)


def group_norms_tree(tree: Any, opt_state: Any, keepdims: bool = True) -> Any:
  """‖x_g‖₂ per penalty group of every penalized leaf of ``tree``.

  Use it on W (params), V (``find_state(s).v``) or Γ (``gamma(s)``) to plot
  the paper's filter-norm paths. For lasso leaves a group is one entry, so the
  "norm" is ``|x|``.

  Args:
    tree: a pytree with the params' structure; anything (``None``,
      ``MaskedNode``) may stand at unpenalized leaves.
    opt_state: a SplitLBI state (or one containing it), for the penalties.
    keepdims: ``True``: keepdims layout (size-1 dims at the reduced axes, the
      shape of ``state.entry``); ``False``: a flat vector of groups, in
      row-major order of the kept (group-index) axes.

  Returns:
    A float32 pytree with the params' structure, ``None`` at unpenalized leaves.
  """
  state = masks_lib.find_state(opt_state)

  def norms(pe, v, x):
    n = penalty_norms(jnp.asarray(x), pe)
    return n if keepdims else n.reshape(-1)

  return masks_lib.map_penalized(norms, state, tree)


def coupling_residue(params: Any, opt_state: Any, nu: Optional[float] = None) -> dict:
  """‖W − Γ‖²/(2ν) of every penalized leaf, keyed by readable path.

  The coupling term of the SplitLBI loss L(W) + ‖W − Γ‖²/(2ν) (paper eq. 3);
  small values mean the dense W is close to its sparse copy Γ.

  Args:
    params: the current W.
    opt_state: a SplitLBI state (or one containing it).
    nu: the coupling ν; default: the ``nu`` of an enclosing
      ``inject_hyperparams`` state.

  Returns:
    ``{path: float32 scalar}`` for every penalized leaf.

  Raises:
    ValueError: if ``nu`` is not given and cannot be found.
  """
  if nu is None:
    nu = masks_lib.injected_hyperparams(opt_state).get("nu")
    if nu is None:
      raise ValueError("coupling_residue: pass nu= (it is only stored in the state by "
                       "optax.inject_hyperparams).")
  state = masks_lib.find_state(opt_state)
  res = masks_lib.map_penalized(
      lambda pe, v, w, g: jnp.sum(jnp.square(w.astype(jnp.float32) - g.astype(jnp.float32)))
      / (2 * nu), state, params, masks_lib.gamma(opt_state))
  flat = masks_lib.params_structure(state).flatten_up_to(res)
  return {path_str(p): r for p, r in zip(masks_lib.params_paths(state), flat) if r is not None}
