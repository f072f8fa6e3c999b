"""SplitLBI penalties whose groups are the channels slimming can remove.

``channel_groups`` traces a network like :func:`~optax_splitlbi.slimming.slim`,
finds its channel classes (the parameter axes that index one channel space:
the stem, the last conv of every block and the projections of a residual
stage, the heads of an attention block's query / key / value projections) and
returns a :class:`~optax_splitlbi.penalties.ChannelGroups` with one
:class:`~optax_splitlbi.penalties.GroupClass` per removable class, so that a
group SplitLBI zeroes is a channel ``slim`` removes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax

from optax_splitlbi import penalties as penalties_lib
from optax_splitlbi.slimming import plan as plan_lib
from optax_splitlbi.slimming.graph import build_graph
from optax_splitlbi.slimming.masks import strip_value
from optax_splitlbi.slimming.program import trace

_MEMBERS = ("producers", "consumers")


@dataclasses.dataclass(frozen=True)
class _Params:
  """Which variable leaves are parameters, and their paths in the params tree.

  Attributes:
    paths: variable leaf index → path relative to the params tree (params only).
    order: variable leaf index → position in the params tree (params only).
    tree: the params tree (``variables["params"]`` or ``variables``).
  """

  paths: dict
  order: dict
  tree: Any


def params_of(variables: Any) -> _Params:
  """The params leaves of ``variables`` (Linen / NNX: ``variables["params"]``)."""
  nested = isinstance(variables, Mapping) and "params" in variables
  paths, order = {}, {}
  for k, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(variables)[0]):
    if nested:
      if not (path and isinstance(path[0], jax.tree_util.DictKey) and path[0].key == "params"):
        continue
      path = path[1:]
    order[k] = len(paths)
    paths[k] = strip_value(penalties_lib.path_str(path))
  return _Params(paths, order, variables["params"] if nested else variables)


def _candidates(cls: plan_lib.Classes, params: _Params) -> dict:
  """root → producer ``(leaf, axis)`` pairs of every removable class."""
  out = {}
  for r in plan_lib.atomic_roots(cls):
    sites = cls.producers.get(r, ())
    if not sites or plan_lib.locks_of(cls, r) or plan_lib.unknown_of(cls, r):
      continue
    if any(s.leaf is None for s in sites):
      continue
    pairs = sorted({(s.leaf, s.axis) for s in sites if s.leaf in params.paths})
    if pairs:
      out[r] = pairs
  return out


def _attached(cls: plan_lib.Classes, prog, params: _Params, cand: dict) -> dict:
  """root → ``(leaf, axis)`` of the params axes in a candidate class that no kernel
  produces or consumes there (biases, norm scales and shifts of the channel)."""
  sites = {(s.leaf, s.axis) for s in list(cls.graph.producers) + list(cls.graph.consumers)
           if s.leaf is not None}
  out: dict = {}
  for k in params.paths:
    for axis, node in enumerate(cls.graph.dims[prog.variables[k]]):
      r = cls.root(node)
      if r in cand and (k, axis) not in sites:
        out.setdefault(r, []).append((k, axis))
  return out


def _assign(cand: dict, attached: dict, size: dict, params: _Params) -> dict:
  """root → member ``(leaf, axis)`` pairs; each leaf in one class: the one with the
  most producing kernels, then the fewest groups, then the first; classes without a
  producer member dropped."""
  first = lambda r: min(params.order[k] for k, _ in cand[r])  # noqa: E731
  roots = sorted(cand, key=first)
  options: dict = {}   # leaf → [(−producers, size, position, root, axis, produces)]
  for pos, r in enumerate(roots):
    producers = len({k for k, _ in cand[r]})
    for produces, pairs in ((True, cand[r]), (False, attached.get(r, ()))):
      for k, axis in pairs:
        options.setdefault(k, []).append((-producers, size[r], pos, r, axis, produces))
  members: dict = {}
  for k, opts in options.items():
    _, _, _, r, axis, produces = min(opts, key=lambda o: o[:3])
    members.setdefault(r, []).append((k, axis, produces))
  out = {}
  for r in roots:
    pairs = sorted(members.get(r, ()), key=lambda m: params.order[m[0]])
    if any(produces for _, _, produces in pairs):
      out[r] = pairs
  by_first = lambda r: min(params.order[k] for k, _, p in out[r] if p)  # noqa: E731
  return {r: out[r] for r in sorted(out, key=by_first)}


def _norm_only(cls: plan_lib.Classes, r: int, owner: dict, penalized: list,
               params: _Params) -> list:
  """The consumer ``(leaf, axis)`` slices of class ``r`` that can enter its norms."""
  out = []
  for s in cls.consumers.get(r, ()):
    if s.leaf is None or s.leaf not in params.paths or owner.get(s.leaf) == (r, s.axis):
      continue
    if s.leaf not in owner and penalized[params.order[s.leaf]] is None:
      continue
    if (s.leaf, s.axis) not in out:
      out.append((s.leaf, s.axis))
  return sorted(out, key=lambda m: (params.order[m[0]], m[1]))


def _class_name(path: str, taken: set) -> str:
  base = path.rsplit("/", 1)[0] if "/" in path else path
  name, i = base, 1
  while name in taken:
    i += 1
    name = f"{base}#{i}"
  taken.add(name)
  return name


def _build(cls: plan_lib.Classes, prog, params: _Params, consumers: bool, lam: Optional[float],
           normalized: bool, rest: Any, attached: bool) -> penalties_lib.ChannelGroups:
  """The :class:`ChannelGroups` of a traced network (see :func:`channel_groups`)."""
  members = named_classes(cls, prog, params, attached)
  owner = {k: (r, axis) for r, (_, pairs) in members.items() for k, axis, _ in pairs}
  penalized = []
  if consumers:
    penalized = jax.tree.leaves(penalties_lib.resolve_penalties(rest, params.tree),
                                is_leaf=lambda x: x is None)
  classes = []
  for r, (name, pairs) in members.items():
    extra = _norm_only(cls, r, owner, penalized, params) if consumers else []
    classes.append(penalties_lib.GroupClass(
        name, int(cls.size[r]), tuple((params.paths[k], axis) for k, axis, _ in pairs),
        tuple((params.paths[k], axis) for k, axis in extra), lam, normalized))
  return penalties_lib.ChannelGroups(tuple(classes), rest)


def named_classes(cls: plan_lib.Classes, prog, params: _Params, attached: bool = True) -> dict:
  """root → (name, member ``(leaf, axis, produces)`` triples) of every removable class,
  named after the module of its first producing leaf (the names of
  :func:`channel_groups`, which :func:`~optax_splitlbi.widen` also takes)."""
  cand = _candidates(cls, params)
  extra = _attached(cls, prog, params, cand) if attached else {}
  members = _assign(cand, extra, cls.size, params)
  taken: set = set()
  out = {}
  for r, pairs in members.items():
    first = next(k for k, _, produces in pairs if produces)
    out[r] = (_class_name(params.paths[first], taken), pairs)
  return out


def channel_groups(apply_fn: Callable[[Any, Any], Any], variables: Any, sample_input: Any, *,
                   members: str = "producers", lam: Optional[float] = None,
                   normalized: bool = False, rest: Any = None,
                   attached: bool = True) -> penalties_lib.ChannelGroups:
  """A SplitLBI penalty whose groups are the channels slimming can remove.

  The forward pass is traced and analysed as by :func:`slim`. Every channel
  class nothing locks (not the model input or output, not reduced over, no
  operation the analysis does not know, every producer a parameter) becomes
  one :class:`~optax_splitlbi.penalties.GroupClass`: group ``c`` is slice ``c``
  of every kernel that produces the channel (a residual stage: the stem, the
  last conv of each block, the projection) and of the parameters attached to
  it (biases, BatchNorm / LayerNorm scales and shifts), so a group that
  SplitLBI zeroes is a channel ``slim`` removes (the paper's filter groups,
  extended across layers).

  A leaf that produces several classes (an attention value projection: heads,
  shared with query and key, and its own head dims) is a member of the one with
  the most producing kernels (then the fewest groups); a class left with no
  producing member is dropped. Classes are named after the module of their
  first producing leaf (``"Conv_0"``, ``"BasicBlock_1/Conv_1"``; ``"#2"`` ...
  on a clash) and ordered by it.

  Args:
    apply_fn: ``(variables, x) -> outputs``; for Linen e.g.
      ``lambda v, x: model.apply(v, x, train=False)``.
    variables: the model's variables. With a ``"params"`` key (Linen:
      ``{"params", "batch_stats"}``) only ``variables["params"]`` is
      optimized and the paths are relative to it; else every leaf counts.
    sample_input: an input batch, for tracing.
    members: ``"producers"``: the groups hold the producing (and attached)
      slices; ``"consumers"``: also every kernel slice that reads the channel
      enters its group norms (``norm_only``, as DepGraph's groups) when that
      kernel is penalized itself (a member of a class, or by ``rest``).
    lam: λ of every class (``None``: the optimizer's ``lam``).
    normalized: threshold λ·√d, d = the entries of a group in all its leaves.
    rest: the penalty of the leaves that are no member (``None``:
      :func:`~optax_splitlbi.penalties.default_penalty`).
    attached: the biases and norm scales / shifts of a channel join its group
      (default), so a zero group is an exactly zero channel; ``False`` leaves
      them to ``rest`` (then W on supp Γ keeps BatchNorm's shift, a constant
      channel that slimming must fold).

  Returns:
    A :class:`~optax_splitlbi.penalties.ChannelGroups` for ``splitlbi(penalty=...)``.

  Raises:
    ValueError: an unknown ``members``.
  """
  if members not in _MEMBERS:
    raise ValueError(f"channel_groups: members must be one of {_MEMBERS}, got {members!r}.")
  prog = trace(apply_fn, variables, sample_input)
  cls = plan_lib.group_classes(build_graph(prog))
  return _build(cls, prog, params_of(variables), members == "consumers", lam, normalized, rest,
                attached)


def channel_groups_nnx(model: Any, sample_input: Any, *, members: str = "producers",
                       lam: Optional[float] = None, normalized: bool = False,
                       rest: Any = None, attached: bool = True) -> penalties_lib.ChannelGroups:
  """:func:`channel_groups` for a Flax NNX module called as ``model(x)``.

  The paths are those of ``nnx.state(model, nnx.Param)`` (without the
  trailing ``"/value"``). Call it with the model in eval mode
  (``model.eval()``) so BatchNorm reads its running statistics.

  Args:
    model: the NNX module.
    sample_input: an input batch.
    members, lam, normalized, rest, attached: see :func:`channel_groups`.

  Returns:
    A :class:`~optax_splitlbi.penalties.ChannelGroups`.
  """
  from optax_splitlbi.slimming.frameworks import nnx_functional  # pylint: disable=g-import-not-at-top
  apply_fn, variables, _ = nnx_functional(model)
  return channel_groups(apply_fn, variables, sample_input,
                        members=members, lam=lam, normalized=normalized, rest=rest,
                        attached=attached)
