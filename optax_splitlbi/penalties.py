"""Sparsity penalties Ω_λ and their per-leaf specification.

SplitLBI couples every penalized weight W with a sparse copy Γ whose structure
is set by the penalty (paper Sec. 2, eq. 5):

- ``Lasso``: Ω₁(Γ) = Σᵢ |Γᵢ|, elementwise sparsity (default for dense kernels).
- ``GroupLasso``: Ω₁(Γ) = Σ_g ‖Γ_g‖₂, one group per index of the *kept* axes;
  ``reduce_axes`` are the axes summed inside one group. For a Flax conv kernel
  (kh, kw, cin, cout) the default reduces (0, 1, 2): one group per output filter.

A penalty is chosen per parameter leaf by a *spec*: ``None`` (the default rule
:func:`default_penalty`), a pytree (or prefix) of specs, or a callable
``(path, leaf) -> spec``. A leaf spec is a :class:`Lasso`, a :class:`GroupLasso`,
the strings ``"lasso"`` / ``"group"``, or ``None`` (not penalized: plain
momentum SGD).

Groups that span leaves (:class:`ChannelGroups`): a group g of a
:class:`GroupClass` is index g of an axis of *several* leaves (a residual
channel: the filters of every conv that writes it and their BatchNorm scales
and shifts), Ω(Γ) = Σ_g ‖(Γ_{m,g})_{m ∈ members}‖₂, one norm over all members.
``optax_splitlbi.slimming.channel_groups`` finds the classes of a network.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
from jax.tree_util import register_static


def _check_lam(lam: float | None, where: str) -> None:
  if lam is None or isinstance(lam, jax.core.Tracer):
    return
  if not math.isfinite(float(lam)) or float(lam) < 0:
    raise ValueError(f"{where}: lam must be a finite number >= 0, got {lam!r}.")


@register_static
@dataclasses.dataclass(frozen=True)
class Lasso:
  """Elementwise ℓ₁ penalty: Prox is the soft-threshold at λ.

  Attributes:
    lam: threshold λ for this leaf; ``None`` uses the optimizer's ``lam``.
  """

  lam: float | None = None

  def __post_init__(self):
    _check_lam(self.lam, "Lasso")


@register_static
@dataclasses.dataclass(frozen=True)
class GroupLasso:
  """Group ℓ₂,₁ penalty Σ_g ‖Γ_g‖₂ (Yuan & Lin 2006; paper eq. 5).

  Prox per group: max(0, 1 − t/‖V_g‖)·V_g with t = λ, or t = λ·√d when
  ``normalized`` (d = group size; the official CIFAR lottery code compares
  ‖V_g‖/√d with λ).

  Attributes:
    reduce_axes: axes that form one group (reduced in the norm); the other
      axes index the groups. ``None``: all axes but the last (one group per
      output filter of an HWIO conv kernel or per output neuron of a dense
      kernel). Negative axes count from the end.
    lam: threshold λ for this leaf; ``None`` uses the optimizer's ``lam``.
    normalized: threshold λ·√d instead of λ.
  """

  reduce_axes: tuple[int, ...] | None = None
  lam: float | None = None
  normalized: bool = False

  def __post_init__(self):
    if self.reduce_axes is not None:
      object.__setattr__(self, "reduce_axes", tuple(int(a) for a in self.reduce_axes))
    _check_lam(self.lam, "GroupLasso")


@register_static
@dataclasses.dataclass(frozen=True)
class GroupClass:
  """Groups that span leaves: group g is index g of an axis in every member leaf.

  Ω(Γ) = Σ_g ‖Γ_g‖₂ with Γ_g = (Γ_m[..., g, ...])_{m ∈ members}: one norm over
  the slices of all members, so one shrinkage factor max(0, 1 − t/‖V'_g‖)
  moves all of them (paper eq. 5 with groups across layers).

  Attributes:
    name: the class's name (reports, masks, per-class targets).
    size: the number of groups (channels, heads, neurons).
    members: ``(leaf path, axis)`` of every member: its slices along ``axis``
      are the class's groups, shrunk together. Paths as ``"Conv_0/kernel"``.
    norm_only: ``(leaf path, axis)`` slices that enter the group norms but keep
      their own leaf's penalty (a channel's consumers, as in DepGraph's groups).
    lam: λ of this class; ``None``: the optimizer's ``lam``.
    normalized: threshold λ·√d, d = the group's entries in all leaves.
  """

  name: str
  size: int
  members: tuple[tuple[str, int], ...]
  norm_only: tuple[tuple[str, int], ...] = ()
  lam: float | None = None
  normalized: bool = False

  def __post_init__(self):
    for field in ("members", "norm_only"):
      object.__setattr__(self, field, tuple((str(p), int(a)) for p, a in getattr(self, field)))
    if not self.members:
      raise ValueError(f"GroupClass {self.name!r}: needs at least one member.")
    _check_lam(self.lam, f"GroupClass {self.name!r}")


@register_static
@dataclasses.dataclass(frozen=True)
class ChannelGroups:
  """A penalty whose groups span leaves, mixed with per-leaf specs.

  Pass it as ``splitlbi(penalty=...)``. Leaves that are members of a class
  get the class's group lasso; every other leaf gets ``rest`` (any per-leaf
  penalty: ``None`` is :func:`default_penalty`, or a spec, a prefix tree or a
  callable). Build it by hand or with
  :func:`optax_splitlbi.slimming.channel_groups` (from the network's dependency
  graph: the structures slimming can remove).

  Attributes:
    classes: the :class:`GroupClass` es; a leaf is a member of at most one.
    rest: the penalty of the other leaves.
  """

  classes: tuple[GroupClass, ...]
  rest: Any = None

  def __post_init__(self):
    object.__setattr__(self, "classes", tuple(self.classes))

  def __len__(self) -> int:
    return len(self.classes)


PenaltySpec = Union[Lasso, GroupLasso, str, None]
PenaltyFn = Callable[[tuple, Any], PenaltySpec]


def conv_filters(lam: float | None = None, normalized: bool = False) -> GroupLasso:
  """One group per output filter of an HWIO conv kernel (reduces kh, kw, cin)."""
  return GroupLasso((0, 1, 2), lam, normalized)


def conv_input_channels(lam: float | None = None, normalized: bool = False) -> GroupLasso:
  """One group per input channel of an HWIO conv kernel (reduces kh, kw, cout)."""
  return GroupLasso((0, 1, 3), lam, normalized)


def dense_neurons(lam: float | None = None, normalized: bool = False) -> GroupLasso:
  """One group per output neuron (column) of an (in, out) dense kernel."""
  return GroupLasso((0,), lam, normalized)


def dense_inputs(lam: float | None = None, normalized: bool = False) -> GroupLasso:
  """One group per input feature (row) of an (in, out) dense kernel."""
  return GroupLasso((1,), lam, normalized)


def attention_heads(lam: float | None = None, normalized: bool = False,
                    head_axis: int = 1) -> GroupLasso:
  """One group per head of a (d_model, heads, head_dim) projection kernel.

  Args:
    lam: per-leaf threshold (``None``: the optimizer's ``lam``).
    normalized: threshold λ·√d.
    head_axis: the axis that indexes heads; every other axis is reduced.
  """
  return _KeepAxis(head_axis, lam, normalized)


@register_static
@dataclasses.dataclass(frozen=True)
class _KeepAxis:
  """A group lasso that keeps one axis and reduces all others (resolved per leaf)."""

  keep_axis: int
  lam: float | None = None
  normalized: bool = False


@register_static
@dataclasses.dataclass(frozen=True)
class LeafPenalty:
  """How a penalized leaf's entries form groups: static, stored in the state.

  It holds no hyperparameter values (the thresholds are arrays in the state),
  so the state's tree structure depends only on the params and this layout.

  Attributes:
    kind: ``"lasso"`` (every entry its own group) or ``"group"``.
    reduce_axes: non-negative axes reduced inside a group (``()`` for lasso).
    group_size: d, the number of entries in one group (1 for lasso); for a
      member of a cross-leaf class, the entries of the group in all its leaves.
    shared: the name of the :class:`GroupClass` whose groups this leaf's
      entries belong to (its one kept axis indexes them), or ``None``.
    norm_of: ``(class name, axis)`` pairs: classes whose group norms this
      leaf's slices along ``axis`` enter without being shrunk by them (the
      consumers of a channel, ``members="consumers"``).
  """

  kind: str
  reduce_axes: tuple[int, ...] = ()
  group_size: int = 1
  shared: str | None = None
  norm_of: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class ResolvedPenalty:
  """A spec resolved against one leaf: its group layout and threshold rule.

  Attributes:
    layout: the leaf's :class:`LeafPenalty`.
    lam: per-leaf λ, or ``None`` for the optimizer's ``lam``.
    normalized: the threshold is λ·√d.
  """

  layout: LeafPenalty
  lam: float | None = None
  normalized: bool = False

  def threshold(self, global_lam):
    """The prox threshold t of this leaf: λ, or λ·√d when normalized."""
    lam = global_lam if self.lam is None else self.lam
    return lam * math.sqrt(self.layout.group_size) if self.normalized else lam


def user_path(path: Sequence[Any]) -> tuple:
  """The key path a user writes: without the ``.value`` key that ends the paths of
  ``nnx.Variable`` leaves (flax 0.12 ``nnx.Optimizer`` gives them to ``init`` only)."""
  path = tuple(path)
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
    return path[:-1]
  return path


def path_str(path: Sequence[Any]) -> str:
  """A readable ``"Conv_0/kernel"`` name for a pytree key path (see :func:`user_path`)."""
  return jax.tree_util.keystr(user_path(path), simple=True, separator="/") or "<root>"


def default_penalty(path: tuple, leaf: Any) -> PenaltySpec:
  """The default rule: 4-D kernels → filter groups, 2-D → lasso, else None.

  As in the official code, 4-D (HWIO conv) kernels get a group lasso with one
  group per output filter, 2-D (dense) kernels an elementwise lasso, and
  biases / norm scales (ndim < 2) no penalty.
  """
  del path
  ndim = len(leaf.shape)
  if ndim == 4:
    return GroupLasso((0, 1, 2))
  if ndim == 2:
    return Lasso()
  return None


def by_ndim(rules: Mapping[int, PenaltySpec]) -> PenaltyFn:
  """A penalty callable choosing the spec by the leaf's ndim.

  Example (the official CIFAR lottery setting)::

    penalty = by_ndim({4: conv_filters(lam=0.1, normalized=True), 2: Lasso(1.0)})

  Args:
    rules: ndim → spec; leaves whose ndim is absent are not penalized.
  """
  rules = dict(rules)

  def rule(path, leaf):
    del path
    return rules.get(len(leaf.shape))

  return rule


def resolve_leaf(spec: PenaltySpec, shape: tuple[int, ...], name: str) -> ResolvedPenalty | None:
  """Resolves one leaf spec against the leaf's shape, validating it.

  Raises:
    ValueError: naming the leaf when the spec does not fit its shape.
  """
  ndim = len(shape)
  if spec is None:
    return None
  if isinstance(spec, str):
    if spec == "lasso":
      spec = Lasso()
    elif spec == "group":
      spec = GroupLasso()
    else:
      raise ValueError(f"Leaf {name!r}: unknown penalty {spec!r}; "
                       "use 'lasso', 'group', None, Lasso(...) or GroupLasso(...).")
  if isinstance(spec, Lasso):
    return ResolvedPenalty(LeafPenalty("lasso"), spec.lam)
  if isinstance(spec, _KeepAxis):
    if not -ndim <= spec.keep_axis < ndim:
      raise ValueError(f"Leaf {name!r} of shape {shape}: head axis {spec.keep_axis} "
                       "is out of range.")
    keep = spec.keep_axis % ndim
    spec = GroupLasso(tuple(a for a in range(ndim) if a != keep), spec.lam, spec.normalized)
  if isinstance(spec, GroupLasso):
    if spec.reduce_axes is None:
      if ndim < 2:
        raise ValueError(
            f"Leaf {name!r} of shape {shape}: a group penalty with default axes needs "
            "ndim >= 2 (one group per index of the last axis); pass "
            "GroupLasso(reduce_axes=...) or use Lasso().")
      axes = tuple(range(ndim - 1))
    else:
      for a in spec.reduce_axes:
        if not -ndim <= a < ndim:
          raise ValueError(f"Leaf {name!r} of shape {shape}: group axis {a} is out "
                           f"of range for ndim {ndim}.")
      axes = tuple(sorted({a % ndim for a in spec.reduce_axes}))
    size = math.prod(shape[a] for a in axes)
    return ResolvedPenalty(LeafPenalty("group", axes, int(size)), spec.lam, spec.normalized)
  raise ValueError(f"Leaf {name!r}: invalid penalty spec {spec!r}.")


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, (str, Lasso, GroupLasso, _KeepAxis))


def resolve_penalties(penalty: Any, params: Any) -> Any:
  """Resolves a penalty spec for every leaf of ``params``.

  Args:
    penalty: ``None`` (:func:`default_penalty`), a callable
      ``(path, leaf) -> spec``, a single spec for every leaf, or a pytree
      (or prefix) of specs matching ``params``.
    params: the parameter pytree.

  Returns:
    A pytree with the structure of ``params`` whose leaves are
    :class:`ResolvedPenalty` or ``None`` (not penalized). It has no array leaves.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  if isinstance(penalty, ChannelGroups):
    return treedef.unflatten(_resolve_classes(penalty, params))
  if penalty is None:
    penalty = default_penalty
  if callable(penalty) and not _is_spec(penalty):
    specs = [penalty(user_path(p), x) for p, x in leaves_with_path]
  elif _is_spec(penalty):
    specs = [penalty] * len(leaves_with_path)
  else:
    try:
      specs = treedef.flatten_up_to(_broadcast_prefix(penalty, params))
    except (ValueError, TypeError) as e:
      raise ValueError(f"penalty: the spec tree does not match the params tree: {e}") from e
  out = [resolve_leaf(s, tuple(x.shape), path_str(p))
         for s, (p, x) in zip(specs, leaves_with_path)]
  return treedef.unflatten(out)


def _broadcast_prefix(prefix: Any, params: Any) -> Any:
  """Broadcasts a prefix tree of specs to the full params structure."""
  return jax.tree.map(
      lambda spec, sub: jax.tree.map(lambda _: spec, sub),
      prefix, params, is_leaf=_is_spec)


def _class_slices(cls: GroupClass, index: dict, shapes: list, field: str) -> list:
  """(leaf index, axis, entries per group) of a class's ``members`` / ``norm_only``.

  Raises:
    ValueError: naming the class and leaf for a missing leaf or a bad axis.
  """
  out = []
  for path, axis in getattr(cls, field):
    if path not in index:
      raise ValueError(f"penalty: group class {cls.name!r}: {field} leaf {path!r} is not a "
                       f"parameter (parameters: {list(index)[:8]}...).")
    i = index[path]
    shape = shapes[i]
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"penalty: group class {cls.name!r}: axis {axis} is out of range for "
                       f"leaf {path!r} of shape {shape}.")
    axis %= len(shape)
    if shape[axis] != cls.size:
      raise ValueError(f"penalty: group class {cls.name!r} has {cls.size} groups but leaf "
                       f"{path!r} has {shape[axis]} along axis {axis} (shape {shape}).")
    out.append((i, axis, math.prod(shape) // cls.size))
  return out


def _resolve_classes(penalty: ChannelGroups, params: Any) -> list:
  """Per leaf (leaf order) the resolved penalty of a :class:`ChannelGroups`."""
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [path_str(p) for p, _ in with_path]
  index = {n: i for i, n in enumerate(names)}
  shapes = [tuple(x.shape) for _, x in with_path]
  rest = jax.tree.structure(params).flatten_up_to(resolve_penalties(penalty.rest, params))
  owner: dict = {}
  norm_of: dict = {}
  seen_names = set()
  for cls in penalty.classes:
    if cls.name in seen_names:
      raise ValueError(f"penalty: two group classes are named {cls.name!r}.")
    seen_names.add(cls.name)
    members = _class_slices(cls, index, shapes, "members")
    extra = _class_slices(cls, index, shapes, "norm_only")
    d = sum(n for _, _, n in members + extra)
    for i, axis, _ in members:
      if i in owner:
        raise ValueError(f"penalty: leaf {names[i]!r} is a member of group classes "
                         f"{owner[i][0]!r} and {cls.name!r}; groups may not overlap.")
      reduce_axes = tuple(a for a in range(len(shapes[i])) if a != axis)
      owner[i] = (cls.name, ResolvedPenalty(
          LeafPenalty("group", reduce_axes, d, cls.name), cls.lam, cls.normalized))
    for i, axis, _ in extra:
      norm_of.setdefault(i, []).append((cls.name, axis))
  out = []
  for i, r in enumerate(rest):
    r = owner[i][1] if i in owner else r
    if i in norm_of:
      if r is None:
        raise ValueError(f"penalty: leaf {names[i]!r} enters the norms of {norm_of[i]} but "
                         "has no penalty of its own (its V is not kept); give it one.")
      r = dataclasses.replace(r, layout=dataclasses.replace(r.layout,
                                                            norm_of=tuple(norm_of[i])))
    out.append(r)
  return out


def member_axis(layout: LeafPenalty) -> int:
  """The axis of a cross-leaf member that indexes its class's groups (the one not reduced)."""
  ndim = len(layout.reduce_axes) + 1
  return next(a for a in range(ndim) if a not in layout.reduce_axes)


def class_slices(layouts: Sequence[LeafPenalty | None]) -> dict[str, list[tuple[int, int, bool]]]:
  """Per cross-leaf class, ``(leaf index, axis, shrunk)`` of every slice in its norms.

  ``shrunk`` is ``True`` for members (their Γ is the class's prox) and ``False``
  for norm-only slices. Classes in order of first appearance.
  """
  out: dict = {}
  for i, pe in enumerate(layouts):
    if pe is None:
      continue
    if pe.shared is not None:
      out.setdefault(pe.shared, []).append((i, member_axis(pe), True))
    for name, axis in pe.norm_of:
      out.setdefault(name, []).append((i, axis, False))
  return out
