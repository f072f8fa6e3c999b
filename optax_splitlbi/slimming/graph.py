"""Which dimensions of a traced network share a channel index.

Every dimension of every value of a :class:`~.program.Program` is a node of a
union-find; each primitive unifies the nodes that must index the same channel
(an elementwise op: all operands' dims; a dense / conv contraction: the
activation's feature dim with the kernel's input dim, the kernel's output dim
with the result's; a transpose: the permuted dims; ...). A class of nodes is
then one channel space: removing channel ``c`` of a class cuts index ``c`` of
every tensor and every parameter axis in it.

Two relations are not equalities and are kept as *composites*: a reshape that
merges dims (``(H, W, C) → H·W·C`` after a flatten, or the inverse split into
attention heads) is a *product* (index ``h·W·C + w·C + c``), and a
concatenate / split along a dim is a list of *segments*.

Contractions with a kernel (an operand that does not depend on the model
input) give *sites*: the kernel's output axes *produce* their class (a filter
of a conv, a neuron of a dense layer, a head of an attention projection), its
contracted axes *consume* theirs. A class some unknown primitive touches is
marked, and a class that must keep all its indices (model input / output,
reduced over, pooled over, padded, contracted between two activations) is
*locked* with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional

from optax_splitlbi.slimming.program import Lit, Op, Program

ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter", "and", "or",
    "xor", "not", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "clamp", "add_any", "neg",
    "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "integer_pow", "square", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "convert_element_type", "copy", "copy_p", "stop_gradient",
    "reduce_precision", "real", "imag", "conj", "complex", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "population_count", "clz", "polygamma", "igamma", "igammac",
    "bessel_i0e", "bessel_i1e"})
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                        "reduce_or", "reduce_xor", "argmax", "argmin"})
CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
WINDOWED = frozenset({"reduce_window_max", "reduce_window_min", "reduce_window_sum"})
# Ops through which a kernel / bias keeps its identity (for sites and folding).
LAYOUT = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision", "transpose",
                    "reshape", "broadcast_in_dim", "squeeze", "rev"})


@dataclasses.dataclass(frozen=True)
class Site:
  """A kernel axis that produces or consumes a channel class.

  Attributes:
    node: the kernel operand's dimension node.
    leaf: index of the variable leaf the kernel is (through layout ops), or
      ``None`` (a computed kernel, or an input-dependent broadcast: never pruned).
    axis: the leaf's axis (``None`` when ``leaf`` is).
    where: the layer (name stack) of the op.
    why: for ``leaf=None``, what makes the channel input-dependent.
  """

  node: int
  leaf: Optional[int]
  axis: Optional[int]
  where: str
  why: str = ""


@dataclasses.dataclass(frozen=True)
class Contraction:
  """A dense / conv op between an activation (operand ``act``) and a kernel."""

  op: int
  act: int
  weight: int
  contracted: tuple[int, ...]  # the activation's contracted dims


@dataclasses.dataclass
class DimGraph:
  """Union-find over value dimensions plus composites, sites and locks."""

  parent: list = dataclasses.field(default_factory=list)
  size: list = dataclasses.field(default_factory=list)
  dims: dict = dataclasses.field(default_factory=dict)          # value id → nodes
  dependent: dict = dataclasses.field(default_factory=dict)     # value id → bool
  leaf_of: dict = dataclasses.field(default_factory=dict)       # value id → (leaf, axes)
  products: list = dataclasses.field(default_factory=list)      # (coarse, factors)
  segments: list = dataclasses.field(default_factory=list)      # (coarse, parts)
  locks: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  unknown: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  producers: list = dataclasses.field(default_factory=list)
  consumers: list = dataclasses.field(default_factory=list)
  contractions: list = dataclasses.field(default_factory=list)

  def fresh(self, size: int) -> int:
    self.parent.append(len(self.parent))
    self.size.append(int(size))
    return len(self.parent) - 1

  def find(self, a: int) -> int:
    while self.parent[a] != a:
      self.parent[a] = self.parent[self.parent[a]]
      a = self.parent[a]
    return a

  def unify(self, a: int, b: int, where: str) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    if self.size[ra] != self.size[rb]:
      raise AssertionError(f"slim: dims of sizes {self.size[ra]} and {self.size[rb]} "
                           f"unified at {where!r}")
    self.parent[max(ra, rb)] = min(ra, rb)

  def lock(self, node: int, kind: str, text: str) -> None:
    self.locks[node].append((kind, text))

  def of(self, i) -> tuple[int, ...]:
    return () if isinstance(i, Lit) else self.dims[i]

  def is_dependent(self, i) -> bool:
    return False if isinstance(i, Lit) else self.dependent[i]


Rule = Callable[[DimGraph, Program, int, Op], None]
_RULES: dict[str, Rule] = {}


def _rule(*names: str):
  def register(fn: Rule) -> Rule:
    for n in names:
      _RULES[n] = fn
    return fn
  return register


def _fresh_out(g: DimGraph, prog: Program, op: Op) -> None:
  for o in op.outputs:
    g.dims[o] = tuple(g.fresh(s) for s in prog.shapes[o])


def _unprunable(g: DimGraph, node: int, op: Op, why: str) -> None:
  g.producers.append(Site(node, None, None, op.where, why))


@_rule(*ELEMENTWISE)
def _elementwise(g, prog, k, op):
  shape = prog.shapes[op.outputs[0]]
  full = [i for i in op.inputs if not isinstance(i, Lit) and prog.shapes[i] == shape]
  out = list(g.of(full[0])) if full else [g.fresh(s) for s in shape]
  for i in op.inputs:
    dims, dep = g.of(i), g.is_dependent(i)
    if not dims:  # a scalar: the same value on every channel
      if dep:
        for n in out:
          _unprunable(g, n, op, f"scaled by an input-dependent scalar ({op.name})")
      continue
    if len(dims) != len(shape):
      raise _unknown(g, prog, op)
    for d, (n, s) in enumerate(zip(dims, prog.shapes[i])):
      if s == shape[d]:
        g.unify(n, out[d], op.where)
      elif dep and shape[d] > 1:
        _unprunable(g, out[d], op, f"an input-dependent value broadcast along it ({op.name})")
  for o in op.outputs:
    g.dims[o] = tuple(out)


@_rule("optimization_barrier")
def _identity_each(g, prog, k, op):
  for i, o in zip(op.inputs, op.outputs):
    g.dims[o] = g.of(i)


@_rule("transpose")
def _transpose(g, prog, k, op):
  dims = g.of(op.inputs[0])
  g.dims[op.outputs[0]] = tuple(dims[p] for p in op.params["permutation"])


@_rule("squeeze")
def _squeeze(g, prog, k, op):
  drop = {d % len(g.of(op.inputs[0])) for d in op.params["dimensions"]}
  g.dims[op.outputs[0]] = tuple(n for d, n in enumerate(g.of(op.inputs[0])) if d not in drop)


@_rule("broadcast_in_dim")
def _broadcast(g, prog, k, op):
  operand = op.inputs[0]
  in_dims, in_shape = g.of(operand), prog.shapes[operand] if not isinstance(operand, Lit) else ()
  shape = op.params["shape"]
  out: list = [None] * len(shape)
  for i, d in enumerate(op.params["broadcast_dimensions"]):
    if in_shape[i] == shape[d]:
      out[d] = in_dims[i]
  for d, n in enumerate(out):
    if n is None:
      out[d] = g.fresh(shape[d])
      if g.is_dependent(operand) and shape[d] > 1:
        _unprunable(g, out[d], op, "an input-dependent value broadcast along it")
  g.dims[op.outputs[0]] = tuple(out)


def reshape_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
  """Minimal groups of non-unit dims with equal products (row-major reshape)."""
  ii = [d for d, s in enumerate(in_shape) if s != 1]
  oo = [d for d, s in enumerate(out_shape) if s != 1]
  groups, i, j = [], 0, 0
  while i < len(ii) and j < len(oo):
    gi, gj = [ii[i]], [oo[j]]
    pi, pj = in_shape[ii[i]], out_shape[oo[j]]
    i, j = i + 1, j + 1
    while pi != pj:
      if pi < pj:
        gi.append(ii[i])
        pi, i = pi * in_shape[ii[i]], i + 1
      else:
        gj.append(oo[j])
        pj, j = pj * out_shape[oo[j]], j + 1
    groups.append((gi, gj))
  return groups


@_rule("reshape")
def _reshape(g, prog, k, op):
  if op.params.get("dimensions") is not None:
    raise _unknown(g, prog, op)
  src = op.inputs[0]
  in_dims, in_shape = g.of(src), prog.shapes[src]
  out_shape = prog.shapes[op.outputs[0]]
  out = [g.fresh(1) if s == 1 else None for s in out_shape]
  for gi, gj in reshape_groups(in_shape, out_shape):
    if len(gi) == 1 and len(gj) == 1:
      out[gj[0]] = in_dims[gi[0]]
      continue
    for d in gj:
      out[d] = g.fresh(out_shape[d])
    if len(gj) == 1:      # merge: flatten (H, W, C) → H·W·C
      g.products.append((out[gj[0]], tuple(in_dims[d] for d in gi)))
    elif len(gi) == 1:    # split: D → (heads, head_dim)
      g.products.append((in_dims[gi[0]], tuple(out[d] for d in gj)))
    else:
      for n in [in_dims[d] for d in gi] + [out[d] for d in gj]:
        g.lock(n, "reshape", f"regrouped by a reshape at {op.where!r}")
  g.dims[op.outputs[0]] = tuple(out)


@_rule(*REDUCTIONS)
def _reduce(g, prog, k, op):
  dims, axes = g.of(op.inputs[0]), set(op.params["axes"])
  for a in axes:
    g.lock(dims[a], "reduced", f"reduced over by {op.name} at {op.where!r}")
  g.dims[op.outputs[0]] = tuple(n for d, n in enumerate(dims) if d not in axes)


@_rule(*CUMULATIVE)
def _cumulative(g, prog, k, op):
  dims = g.of(op.inputs[0])
  g.lock(dims[op.params["axis"]], "reduced", f"accumulated along by {op.name} at {op.where!r}")
  g.dims[op.outputs[0]] = dims


@_rule("rev")
def _rev(g, prog, k, op):
  dims = g.of(op.inputs[0])
  for a in op.params["dimensions"]:
    g.lock(dims[a], "reversed", f"reversed at {op.where!r}")
  g.dims[op.outputs[0]] = dims


def _per_dim(g, op, dims, out_shape, same: list[bool], what: str) -> None:
  """Output dim d is input dim d where ``same[d]``; else a fresh dim, both locked
  (the op fixes the output size from the input size)."""
  out = []
  for d, n in enumerate(dims):
    if same[d]:
      out.append(n)
    else:
      out.append(g.fresh(out_shape[d]))
      for m in (n, out[-1]):
        g.lock(m, what, f"{what} at {op.where!r}")
  g.dims[op.outputs[0]] = tuple(out)


@_rule(*WINDOWED)
def _windowed(g, prog, k, op):
  p = op.params
  ones = (1,) * len(p["window_dimensions"])
  same = [w == 1 and s == 1 and tuple(pad) == (0, 0) and b == 1 and wd == 1
          for w, s, pad, b, wd in zip(p["window_dimensions"], p["window_strides"], p["padding"],
                                      p.get("base_dilation", ones), p.get("window_dilation", ones))]
  _per_dim(g, op, g.of(op.inputs[0]), prog.shapes[op.outputs[0]], same, "pooled over")


@_rule("pad")
def _pad(g, prog, k, op):
  same = [tuple(c) == (0, 0, 0) for c in op.params["padding_config"]]
  _per_dim(g, op, g.of(op.inputs[0]), prog.shapes[op.outputs[0]], same, "padded")


@_rule("slice")
def _slice(g, prog, k, op):
  p, shape = op.params, prog.shapes[op.inputs[0]]
  strides = p["strides"] or (1,) * len(shape)
  same = [st == 0 and li == s and sd == 1
          for st, li, sd, s in zip(p["start_indices"], p["limit_indices"], strides, shape)]
  _per_dim(g, op, g.of(op.inputs[0]), prog.shapes[op.outputs[0]], same, "sliced")


@_rule("iota")
def _iota(g, prog, k, op):
  _fresh_out(g, prog, op)
  for n in g.dims[op.outputs[0]]:  # its values are its indices
    g.lock(n, "iota", f"indexed by an iota at {op.where!r}")


@_rule("concatenate")
def _concatenate(g, prog, k, op):
  axis = op.params["dimension"]
  first = g.of(op.inputs[0])
  for i in op.inputs[1:]:
    for d, n in enumerate(g.of(i)):
      if d != axis:
        g.unify(first[d], n, op.where)
  out = list(first)
  out[axis] = g.fresh(prog.shapes[op.outputs[0]][axis])
  g.segments.append((out[axis], tuple(g.of(i)[axis] for i in op.inputs)))
  g.dims[op.outputs[0]] = tuple(out)


@_rule("split")
def _split(g, prog, k, op):
  axis, dims = op.params["axis"], g.of(op.inputs[0])
  parts = []
  for o in op.outputs:
    out = list(dims)
    out[axis] = g.fresh(prog.shapes[o][axis])
    parts.append(out[axis])
    g.dims[o] = tuple(out)
  g.segments.append((dims[axis], tuple(parts)))


def _kernel_sites(g: DimGraph, w, produce: list[int], consume: list[int], where: str) -> None:
  """Registers the kernel operand ``w``'s axes as producer / consumer sites."""
  leaf, axes = g.leaf_of.get(w, (None, None)) if not isinstance(w, Lit) else (None, None)
  dims = g.of(w)
  for sites, which in ((g.producers, produce), (g.consumers, consume)):
    for d in which:
      ax = axes[d] if axes is not None else None
      sites.append(Site(dims[d], leaf if ax is not None else None, ax, where,
                        "" if ax is not None else "a computed (not a variable) kernel"))


@_rule("dot_general")
def _dot_general(g, prog, k, op):
  (lc, rc), (lb, rb) = op.params["dimension_numbers"]
  lhs, rhs = op.inputs
  ld, rd = g.of(lhs), g.of(rhs)
  for a, b in zip(lc, rc):
    g.unify(ld[a], rd[b], op.where)
  for a, b in zip(lb, rb):
    g.unify(ld[a], rd[b], op.where)
  lfree = [d for d in range(len(ld)) if d not in lc and d not in lb]
  rfree = [d for d in range(len(rd)) if d not in rc and d not in rb]
  g.dims[op.outputs[0]] = tuple([ld[a] for a in lb] + [ld[d] for d in lfree] +
                                [rd[d] for d in rfree])
  dep_l, dep_r = g.is_dependent(lhs), g.is_dependent(rhs)
  if dep_l and dep_r:
    for a in lc:
      g.lock(ld[a], "activations", f"contracted between two activations at {op.where!r}")
    # A free dim of one activation is multiplied by the other, input-dependent one:
    # its channel is not constant when its producers are pruned (a GQA query head
    # whose q is pruned still averages its group's values). Batch dims are shared
    # (both operands' producers are the channel's), so they keep that route.
    for dims, free in ((ld, lfree), (rd, rfree)):
      for d in free:
        _unprunable(g, dims[d], op, "multiplied by another activation (dot_general)")
  elif dep_l != dep_r:
    act, w = (0, 1) if dep_l else (1, 0)
    wc, wb, wfree = (rc, rb, rfree) if w == 1 else (lc, lb, lfree)
    g.contractions.append(Contraction(k, act, w, tuple(lc if act == 0 else rc)))
    _kernel_sites(g, op.inputs[w], list(wfree) + list(wb), list(wc) + list(wb), op.where)


@_rule("conv_general_dilated")
def _conv(g, prog, k, op):
  p = op.params
  dn = p["dimension_numbers"]
  lhs, rhs = op.inputs
  ld, rd = g.of(lhs), g.of(rhs)
  if p["batch_group_count"] != 1 or not g.is_dependent(lhs) or g.is_dependent(rhs):
    raise _unknown(g, prog, op)
  out_shape = prog.shapes[op.outputs[0]]
  out = [None] * len(out_shape)
  out[dn.out_spec[0]] = ld[dn.lhs_spec[0]]
  out[dn.out_spec[1]] = rd[dn.rhs_spec[0]]
  for d in dn.out_spec[2:]:  # spatial: sized by the window
    out[d] = g.fresh(out_shape[d])
    g.lock(out[d], "spatial", f"a spatial dim of the convolution at {op.where!r}")
  for d in dn.rhs_spec[2:]:
    g.lock(rd[d], "spatial", f"a window dim of the convolution at {op.where!r}")
  groups = p["feature_group_count"]
  lhs_c, rhs_i, rhs_o = ld[dn.lhs_spec[1]], rd[dn.rhs_spec[1]], rd[dn.rhs_spec[0]]
  if groups == 1:
    g.unify(lhs_c, rhs_i, op.where)
    consume = [dn.rhs_spec[1]]
  else:  # channel (group, index in group) on both sides: C = G × C/G
    grp = g.fresh(groups)
    g.products.append((lhs_c, (grp, rhs_i)))
    g.products.append((rhs_o, (grp, g.fresh(g.size[rhs_o] // groups))))
    consume = []
  g.dims[op.outputs[0]] = tuple(out)
  g.contractions.append(Contraction(k, 0, 1, (dn.lhs_spec[1],)))
  _kernel_sites(g, rhs, [dn.rhs_spec[0]], consume, op.where)


class UnknownPrimitive(Exception):
  """Raised inside a rule that cannot handle an op; the op is then opaque."""


def _unknown(g, prog, op) -> UnknownPrimitive:
  del g, prog
  return UnknownPrimitive(op.name)


def _opaque(g: DimGraph, prog: Program, op: Op) -> None:
  """An op the analysis does not understand: fresh outputs, every dim marked."""
  _fresh_out(g, prog, op)
  text = f"primitive {op.name!r} at {op.where or '<top level>'!r}"
  for i in list(op.inputs) + list(op.outputs):
    for n in g.of(i):
      g.unknown[n].append(text)


def _trace_leaf(g: DimGraph, prog: Program, op: Op) -> None:
  """Follows a variable leaf through layout ops (for kernel sites and biases)."""
  if op.name not in LAYOUT or not op.inputs:  # (iota and other nullary ops have none)
    return
  src = op.inputs[0]
  if isinstance(src, Lit) or src not in g.leaf_of:
    return
  leaf, axes = g.leaf_of[src]
  in_shape, out_shape = prog.shapes[src], prog.shapes[op.outputs[0]]
  if op.name == "transpose":
    new = tuple(axes[p] for p in op.params["permutation"])
  elif op.name == "broadcast_in_dim":
    new = [None] * len(out_shape)
    for i, d in enumerate(op.params["broadcast_dimensions"]):
      new[d] = axes[i] if in_shape[i] == out_shape[d] else None
  elif op.name in ("reshape", "squeeze"):
    kept = [a for a, s in zip(axes, in_shape) if s != 1]
    if [s for s in in_shape if s != 1] != [s for s in out_shape if s != 1]:
      return
    it = iter(kept)
    new = [next(it) if s != 1 else None for s in out_shape]
  else:
    new = axes
  g.leaf_of[op.outputs[0]] = (leaf, tuple(new))


def build_graph(prog: Program) -> DimGraph:
  """The :class:`DimGraph` of ``prog`` (see the module docstring)."""
  g = DimGraph()
  for k, v in enumerate(prog.variables):
    g.dims[v] = tuple(g.fresh(s) for s in prog.shapes[v])
    g.dependent[v] = False
    g.leaf_of[v] = (k, tuple(range(len(prog.shapes[v]))))
  for v in prog.consts:
    g.dims[v] = tuple(g.fresh(s) for s in prog.shapes[v])
    g.dependent[v] = False
  for v in prog.inputs:
    g.dims[v] = tuple(g.fresh(s) for s in prog.shapes[v])
    g.dependent[v] = True
    for n in g.dims[v]:
      g.lock(n, "input", "the model input")
  for k, op in enumerate(prog.ops):
    rule = _RULES.get(op.name)
    try:
      if rule is None:
        raise UnknownPrimitive(op.name)
      rule(g, prog, k, op)
    except UnknownPrimitive:
      _opaque(g, prog, op)
    dep = any(g.is_dependent(i) for i in op.inputs)
    for o in op.outputs:
      g.dependent[o] = dep
    _trace_leaf(g, prog, op)
  for o in prog.outputs:
    for n in g.of(o):
      g.lock(n, "output", "the model output")
  return g
