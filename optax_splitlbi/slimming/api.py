"""Public slimming functions: ``slim`` (any forward function), ``slim_linen``, ``slim_nnx``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import numpy as np

from optax_splitlbi.slimming import fold as fold_lib
from optax_splitlbi.slimming import plan as plan_lib
from optax_splitlbi.slimming import report as report_lib
from optax_splitlbi.slimming.graph import build_graph
from optax_splitlbi.slimming.program import Program, evaluate, record, trace

_POLICIES = ("fold", "keep")


@dataclasses.dataclass(frozen=True)
class SlimModel:
  """A slimmed network.

  Attributes:
    variables: the slim variables, in the structure of the input ``variables``
      (masked weights, removed channels cut, constants folded into biases).
    apply_fn: jitted ``apply_fn(variables, x)`` running the slim network; works
      for any model the analysis understands (it replays the traced forward pass
      at the slim shapes) and is differentiable.
    report: see :func:`format_slim_report` (``layers``, ``folds``, ``params``,
      ``flops``, ``max_abs_diff``).
    kept: per variable leaf (the input structure), a tuple with, per axis, the
      kept indices (``None``: all kept); see :meth:`cut`.
    module: the slim Linen / NNX module (``slim_linen`` / ``slim_nnx``), else ``None``.
  """

  variables: Any
  apply_fn: Callable
  report: dict
  kept: Any
  module: Any = None

  def cut(self, tree: Any) -> Any:
    """Cuts a tree shaped like the dense variables (masks, a gradient, an optimizer
    state's buffers) to the slim shapes with ``kept``."""
    def one(x, kept):
      x = np.asarray(x)
      for axis, k in enumerate(kept):
        x = x if k is None else np.take(x, k, axis=axis)
      return x
    return jax.tree.map(one, tree, self.kept)


def leaf_paths(tree: Any) -> list[str]:
  """Path strings (``a/b/c``) of the leaves of ``tree``."""
  return [jax.tree_util.keystr(p, simple=True, separator="/")
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _strip_value(name: str) -> str:
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
  index = {_strip_value(n): i for i, n in enumerate(names)}
  leaves = jax.tree.leaves(variables)
  prefix = _mask_prefix(variables, masks)
  out = {}
  for path, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]:
    name = _strip_value(prefix + jax.tree_util.keystr(path, simple=True, separator="/"))
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


def _check_masks(cls: plan_lib.Classes, masks: dict, names: list) -> None:
  """A mask that prunes every output channel of a layer is an error."""
  for r, sites in cls.producers.items():
    for s in sites:
      if s.leaf in masks and plan_lib.site_pruned(s, masks, cls.size[r]).all():
        raise ValueError(
            f"slim: the mask of {names[s.leaf]!r} prunes every output channel along axis "
            f"{s.axis} (layer {s.where!r}); a layer needs at least one channel.")


def _layers_of(cls: plan_lib.Classes, r: int, names: list) -> str:
  sites = [s for c in [r] + cls.ancestors(r) for s in list(cls.producers.get(c, ())) +
           list(cls.consumers.get(c, ())) if s.leaf is not None]
  return ", ".join(repr(n) for n in sorted({names[s.leaf] for s in sites})) or "a dimension"


def _check_removal(cls: plan_lib.Classes, removed: dict, names: list) -> None:
  for r, rm in removed.items():
    if not rm.any():
      continue
    unknown = plan_lib.unknown_of(cls, r)
    if unknown:
      raise ValueError(
          f"slim: cannot remove channels of {_layers_of(cls, r, names)}: "
          f"{unknown[0]} uses them and the dependency analysis does not understand it.")
    if rm.all():
      raise ValueError(f"slim: the masks remove every channel shared by "
                       f"{_layers_of(cls, r, names)}; keep at least one.")


def _batch_roots(prog: Program, cls: plan_lib.Classes) -> set:
  g = cls.graph
  return {cls.root(g.of(v)[0]) for v in prog.inputs if prog.shapes[v]}


def _batch_fixed_reason(prog: Program, cls: plan_lib.Classes, batch: set) -> Optional[str]:
  """Why the slim apply cannot take another batch size (None if it can)."""
  g = cls.graph
  for v in list(prog.variables) + list(prog.consts):
    if any(cls.root(n) in batch for n in g.of(v)):
      return "shared with a variable or constant"
  for r in batch:
    for kind, text in plan_lib.locks_of(cls, r):
      if kind not in ("input", "output"):
        return text
    if cls.unknown.get(r) or any(c.kind == "segment" for c in cls.composites
                                 if r == c.coarse or r in c.parts):
      return "used by an operation whose shape depends on it"
  return None


def _slice(x, dims, cls: plan_lib.Classes, keep: dict):
  """``x`` cut to the kept indices of its dims' classes; also the kept index tuple."""
  x = np.asarray(x)
  kept = []
  for axis, n in enumerate(dims):
    k = keep.get(cls.root(n))
    if k is None or len(k) == x.shape[axis]:
      kept.append(None)
      continue
    x = np.take(x, k, axis=axis)
    kept.append(k)
  return x, tuple(kept)


def _class_sizes(cls: plan_lib.Classes, keep: dict, override: dict) -> Callable[[int], int]:
  """root → slim size (``override``: new sizes of some atomic classes, e.g. the batch)."""
  memo: dict = dict(override)

  def size(r: int) -> int:
    if r not in memo:
      memo[r] = _derived_size(cls, keep, r, size)
    return memo[r]

  return size


def _derived_size(cls, keep, r, size) -> int:
  cis = cls.coarse_of.get(r, ())
  if not cis or len({cls.composites[ci].parts for ci in cis}) > 1:
    return len(keep[r]) if r in keep else cls.size[r]
  comp = cls.composites[cis[0]]
  sizes = [size(p) for p in comp.parts]
  return int(np.prod(sizes)) if comp.kind == "product" else int(sum(sizes))


def _make_apply(prog: Program, cls: plan_lib.Classes, keep: dict, consts: dict,
                batch: set, fixed_reason: Optional[str]) -> Callable:
  g = cls.graph
  roots = [tuple(cls.root(n) for n in g.dims[v]) for v in range(len(prog.shapes))]
  sample_batch = next((prog.shapes[v][0] for v in prog.inputs if prog.shapes[v]), None)
  n_vars = len(prog.variables)

  def apply(variables, x):
    var_leaves, x_leaves = jax.tree.leaves(variables), jax.tree.leaves(x)
    if len(var_leaves) != n_vars:
      raise ValueError(f"slim apply_fn: expected {n_vars} variable leaves, got "
                       f"{len(var_leaves)}.")
    b = np.shape(x_leaves[0])[0] if x_leaves and np.ndim(x_leaves[0]) else None
    override = {}
    if b is not None and b != sample_batch:
      if fixed_reason is not None:
        raise ValueError(f"slim apply_fn: traced at batch {sample_batch}, called with {b}; "
                         f"the batch axis is {fixed_reason}, so the batch size is fixed.")
      override = {r: b for r in batch}
    size = _class_sizes(cls, keep, override)
    shape_of = lambda v: tuple(size(r) for r in roots[v])  # noqa: E731
    outs = evaluate(prog, var_leaves, x_leaves, consts=consts, shape_of=shape_of)
    return jax.tree.unflatten(prog.out_tree, outs)

  return jax.jit(apply)


def _decide(cls, masks, names, forced, round_to: int):
  """Removable channels, kept indices, and the channels kept back for ``round_to``."""
  removed = plan_lib.removable(cls, masks, forced)
  _check_removal(cls, removed, names)
  rounded = plan_lib.round_up(removed, round_to)
  for r, idx in rounded.items():
    removed[r][sorted(idx)] = False
  return removed, plan_lib.keep_indices(cls, removed), rounded


def _plan(prog, cls, masks, masked, x_leaves, batch, names, inexact, round_to):
  """Decides the kept channels and folds the removed ones (see ``slim``).

  Returns:
    ``(keep, folded leaves, folds, (forced keeps, rounding keeps, round_to),
    masked outputs)``.
  """
  forced: dict = {}
  decide = lambda: _decide(cls, masks, names, forced, round_to)  # noqa: E731
  removed, keep, rounded = decide()
  todo, fn = fold_lib.contribution_fn(prog, cls.graph, cls, keep)
  dense_out, env, first = record(prog, masked, x_leaves, fold_lib.needed_values(prog, cls.graph),
                                 extra=fn, shape_of=_shapes_at_batch(prog, cls, batch, x_leaves))
  contribs = dict(zip(todo, first))
  while True:
    leaves, folds, contributing = fold_lib.fold_constants(
        prog, cls.graph, cls, contribs, env, masked, batch, keep)
    new = {(r, i) for r, i in contributing if r in removed and removed[r][i]}
    if inexact == "fold" or not new:
      return keep, leaves, folds, (forced, rounded, round_to), dense_out
    for r, i in new:
      forced.setdefault(r, set()).add(i)
    removed, keep, rounded = decide()
    contribs = fold_lib.contributions(prog, cls.graph, cls, keep, env)


def _shapes_at_batch(prog, cls, batch, x_leaves):
  """Dense value shapes with the batch axis at the size of ``x_leaves``."""
  b = np.shape(x_leaves[0])[0] if x_leaves and np.ndim(x_leaves[0]) else None
  sample = next((prog.shapes[v][0] for v in prog.inputs if prog.shapes[v]), None)
  if b is None or b == sample:
    return None
  size = _class_sizes(cls, {}, {r: b for r in batch})
  return lambda v: tuple(size(cls.root(n)) for n in cls.graph.dims[v])


def sub_batch(x: Any, resizable: bool, n: int = 4) -> Any:
  """The first ``n`` examples of ``x`` when the model allows another batch size."""
  leaves = jax.tree.leaves(x)
  if not resizable or not leaves or any(np.ndim(a) == 0 for a in leaves):
    return x
  return jax.tree.map(lambda a: a[:n], x)


def max_diff(a_leaves, b_leaves) -> float:
  """Largest absolute difference between two lists of arrays."""
  return max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
              for a, b in zip(a_leaves, b_leaves) if np.size(a)), default=0.0)


def slim(apply_fn: Callable[[Any, Any], Any], variables: Any, masks: Any, sample_input: Any,
         *, inexact: str = "fold", count_flops: bool = True, verify: bool = True,
         round_to: int = 1) -> SlimModel:
  """Removes the pruned channels of a network: a smaller network, same outputs.

  The forward pass ``apply_fn(variables, sample_input)`` is traced to a jaxpr;
  a dependency analysis over its dimensions finds which parameter axes share a
  channel index (through residual adds, concatenations, flattens, grouped convs,
  attention heads). A channel is removed where every layer that produces it has
  its filter / neuron / head pruned by ``masks`` (or every layer that reads it
  has the matching inputs pruned); its constant value in the masked model is
  folded into the next layer's bias or BatchNorm mean. The slim network
  computes the masked dense network W ∘ mask (BatchNorm as in ``apply_fn``).

  Args:
    apply_fn: ``(variables, x) -> outputs``; for Linen e.g.
      ``lambda v, x: model.apply(v, x, train=False)``.
    variables: the model's variables (any pytree; Linen: ``{"params": ...,
      "batch_stats": ...}``).
    masks: bool masks (True = kept) with the structure of ``variables`` or of
      ``variables["params"]``: full-shape (``support``, ``entered_by``,
      ``prune_to_sparsity``) or per-group keepdims (``group_support``); ``None``
      for unmasked leaves. A lasso mask counts as pruning a neuron when its whole
      slice is pruned.
    sample_input: an input batch (leading axis: batch); used for tracing, for
      the constant folding and to measure the slim model against the masked one.
    inexact: ``"fold"``: a removed constant channel that reaches a consumer
      where it is not the same at every position (a zero-padded conv) is folded
      at the central position and reported with its error; ``"keep"``: such
      channels are kept instead, so the slim model is exact.
    count_flops: add XLA's FLOP counts of the dense and slim forward passes
      (at the batch size of ``sample_input``).
    verify: run the slim network on (up to 4 examples of) ``sample_input`` and
      report its largest difference from the masked model (``max_abs_diff``).
    round_to: keep a multiple of this many channels in every class that loses
      some (pruned channels are kept back, lowest index first; still exact).
      Accelerators and XLA:CPU run odd channel counts slowly: 8 is a good value
      for GPUs (benchmarks/RESULTS.md).

  Returns:
    A :class:`SlimModel`.

  Raises:
    ValueError: masks that do not match the variables (naming the leaf), a mask
      that prunes every channel of a layer, or a channel to remove that an
      operation the analysis does not know uses (naming the primitive and layer).
  """
  if inexact not in _POLICIES:
    raise ValueError(f"inexact must be one of {_POLICIES}, got {inexact!r}.")
  if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
    raise ValueError(f"slim: round_to must be a positive int, got {round_to!r}.")
  leaves, treedef = jax.tree.flatten(variables)
  leaf_names = leaf_paths(variables)
  masks_ = leaf_masks(variables, masks)
  masked = [np.where(masks_[i], np.asarray(x), np.zeros((), np.asarray(x).dtype))
            if i in masks_ else np.asarray(x) for i, x in enumerate(leaves)]
  prog = trace(apply_fn, treedef.unflatten(masked), sample_input)
  cls = plan_lib.group_classes(build_graph(prog))
  _check_masks(cls, masks_, leaf_names)
  batch = _batch_roots(prog, cls)
  fixed = _batch_fixed_reason(prog, cls, batch)
  probe = sub_batch(sample_input, fixed is None)
  keep, folded, folds, kept_back, dense_out = _plan(
      prog, cls, masks_, masked, jax.tree.leaves(probe), batch, leaf_names, inexact, round_to)
  cut = [_slice(x, cls.graph.dims[v], cls, keep) for v, x in zip(prog.variables, folded)]
  consts = {v: _slice(c, cls.graph.dims[v], cls, keep)[0] for v, c in prog.consts.items()}
  slim_vars = treedef.unflatten(jax.device_put([x for x, _ in cut]))
  slim_apply = _make_apply(prog, cls, keep, consts, batch, fixed)
  report = dict(
      layers=report_lib.layer_report(cls, masks_, keep, kept_back, leaf_names,
                                     ([np.shape(x) for x in leaves], [x.shape for x, _ in cut])),
      folds=report_lib.fold_report(folds, leaf_names),
      params=dict(dense=report_lib.count(report_lib.params_of(variables)),
                  masked=report_lib.count_nonzero(report_lib.params_of(treedef.unflatten(masked))),
                  slim=report_lib.count(report_lib.params_of(slim_vars))),
      max_abs_diff=max_diff(jax.tree.leaves(slim_apply(slim_vars, probe)), dense_out)
      if verify else None,
      max_abs_output=max((float(np.max(np.abs(a))) for a in dense_out if np.size(a)), default=0.),
      batch_resizable=fixed is None,
      flops=report_lib.flop_counts(apply_fn, variables, slim_apply, slim_vars, sample_input)
      if count_flops else None)
  return SlimModel(slim_vars, slim_apply, report, treedef.unflatten([k for _, k in cut]))


def coupled_channels(apply_fn: Callable[[Any, Any], Any], variables: Any,
                     sample_input: Any) -> list[list[tuple[str, int]]]:
  """Which parameter axes produce the same channels (the coupling ``slim`` respects).

  Each group lists ``(variable path, axis)`` of the kernels whose output axis
  indexes one channel space: a plain layer alone, the stem / projection and the
  last conv of every block of a residual stage together. A channel of a group
  can be removed only if every kernel of the group prunes it, so masks that agree
  within each group (e.g. one importance ranking per group) slim further.

  Args:
    apply_fn, variables, sample_input: as for :func:`slim`.

  Returns:
    The groups, each sorted, in the order of their first kernel.
  """
  prog = trace(apply_fn, variables, sample_input)
  cls = plan_lib.group_classes(build_graph(prog))
  paths = leaf_paths(variables)
  groups = [sorted({(paths[s.leaf], s.axis) for s in sites if s.leaf is not None})
            for sites in cls.producers.values()]
  return sorted((g for g in groups if g), key=lambda g: paths.index(g[0][0]))
