"""A model's forward pass as one flat list of primitive applications.

``trace`` turns ``apply_fn(variables, x)`` into a :class:`Program`: the jaxpr
of the call with every call-like sub-jaxpr (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``, ``closed_call``) inlined, and every value given
an integer id. ``evaluate`` runs a program, optionally at other shapes: the
shape-carrying parameters of a few primitives (``broadcast_in_dim``,
``reshape``, ``iota``, ``split``, full-range ``slice``s, the group count of a
grouped convolution) are rewritten from the new shapes of the values, so the
same program runs a network whose channel dimensions were cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
from jax.extend import core as jcore

# Primitives whose sub-jaxpr is inlined (same inputs and outputs as the call).
CALL_PRIMITIVES = frozenset({
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint", "named_call"})
_SUB_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal scalar operand."""

  val: Any


@dataclasses.dataclass
class Op:
  """One primitive application: ``outputs = prim.bind(*inputs, **params)``.

  ``inputs`` holds value ids (``int``) or :class:`Lit`; ``where`` names the
  layer (the Flax / JAX name stack) for messages.
  """

  prim: Any
  params: dict
  inputs: tuple
  outputs: tuple[int, ...]
  where: str

  @property
  def name(self) -> str:
    return self.prim.name


@dataclasses.dataclass
class Program:
  """A flat SSA program; values are ids into ``shapes`` / ``dtypes``.

  Attributes:
    shapes, dtypes: per value id.
    ops: the primitive applications in order.
    variables: value ids of the flattened ``variables`` leaves.
    inputs: value ids of the flattened model-input leaves.
    consts: value id → constant array (closed-over constants).
    outputs: value ids (or literals) of the flattened outputs.
    out_tree: the treedef of ``apply_fn``'s output.
  """

  shapes: list
  dtypes: list
  ops: list
  variables: list
  inputs: list
  consts: dict
  outputs: list
  out_tree: Any = None

  def new_value(self, shape, dtype) -> int:
    self.shapes.append(tuple(int(s) for s in shape))
    self.dtypes.append(dtype)
    return len(self.shapes) - 1

  def users(self) -> dict[int, list[int]]:
    """value id → indices of the ops that read it."""
    out: dict[int, list[int]] = {}
    for k, op in enumerate(self.ops):
      for i in op.inputs:
        if isinstance(i, int):
          out.setdefault(i, []).append(k)
    return out

  def producer(self) -> dict[int, int]:
    """value id → index of the op that writes it."""
    return {o: k for k, op in enumerate(self.ops) for o in op.outputs}


def _sub_jaxpr(eqn) -> Optional[tuple[Any, Sequence[Any]]]:
  """(jaxpr, consts) of a call-like equation, or None."""
  if eqn.primitive.name not in CALL_PRIMITIVES:
    return None
  for key in _SUB_JAXPR_KEYS:
    sub = eqn.params.get(key)
    if sub is None:
      continue
    jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr, consts
  return None


def _where(outer: str, eqn) -> str:
  inner = str(eqn.source_info.name_stack)
  return "/".join(s for s in (outer, inner) if s)


def _inline(prog: Program, jaxpr, env: dict, where: str) -> None:
  """Appends ``jaxpr``'s equations to ``prog``; ``env`` maps its vars to ids."""

  def read(v):
    return Lit(v.val) if isinstance(v, jcore.Literal) else env[v]

  for eqn in jaxpr.eqns:
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      inner_jaxpr, consts = sub
      inner_env = {}
      for cv, c in zip(inner_jaxpr.constvars, consts):
        inner_env[cv] = _add_const(prog, c)
      for iv, ov in zip(inner_jaxpr.invars, eqn.invars):
        inner_env[iv] = read(ov)
      _inline(prog, inner_jaxpr, inner_env, _where(where, eqn))
      for ov, iv in zip(eqn.outvars, inner_jaxpr.outvars):
        env[ov] = _literal_value(prog, iv) if isinstance(iv, jcore.Literal) else inner_env[iv]
      continue
    ins = tuple(read(v) for v in eqn.invars)
    outs = tuple(prog.new_value(v.aval.shape, v.aval.dtype) for v in eqn.outvars)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
    prog.ops.append(Op(eqn.primitive, dict(eqn.params), ins, outs, _where(where, eqn)))


def _add_const(prog: Program, c) -> int:
  c = np.asarray(c) if not isinstance(c, jax.Array) else c
  vid = prog.new_value(np.shape(c), c.dtype)
  prog.consts[vid] = c
  return vid


def _literal_value(prog: Program, lit) -> int:
  """A sub-jaxpr that returns a literal: materialize it as a constant."""
  return _add_const(prog, np.asarray(lit.val))


def trace(apply_fn: Callable, variables: Any, x: Any) -> Program:
  """The flat program of ``apply_fn(variables, x)``.

  Args:
    apply_fn: ``(variables, x) -> outputs`` (any pytrees).
    variables: the model's variables; their leaves become ``Program.variables``.
    x: a sample input; its leaves become ``Program.inputs``.

  Returns:
    The inlined :class:`Program`.
  """
  var_leaves, var_tree = jax.tree.flatten(variables)
  x_leaves, x_tree = jax.tree.flatten(x)
  n = len(var_leaves)

  out_tree = []

  def flat_fn(*leaves):
    out = apply_fn(var_tree.unflatten(leaves[:n]), x_tree.unflatten(leaves[n:]))
    flat, tree = jax.tree.flatten(out)
    out_tree.append(tree)
    return flat

  closed = jax.make_jaxpr(flat_fn)(*var_leaves, *x_leaves)
  prog = Program([], [], [], [], [], {}, [], out_tree[0])
  env = {}
  for cv, c in zip(closed.jaxpr.constvars, closed.consts):
    env[cv] = _add_const(prog, c)
  for k, v in enumerate(closed.jaxpr.invars):
    env[v] = prog.new_value(v.aval.shape, v.aval.dtype)
    (prog.variables if k < n else prog.inputs).append(env[v])
  _inline(prog, closed.jaxpr, env, "")
  prog.outputs = [Lit(v.val) if isinstance(v, jcore.Literal) else env[v]
                  for v in closed.jaxpr.outvars]
  return prog


# ------------------------------------------------------------------- evaluation


def _full_range(start, limit, stride, size) -> bool:
  return start == 0 and limit == size and (stride is None or stride == 1)


def resized_params(op: Op, in_shapes: list, out_shapes: list, old_in: list) -> dict:
  """``op.params`` for operands / results of new shapes (see module docstring)."""
  p, name = op.params, op.name
  if name == "broadcast_in_dim":
    return dict(p, shape=tuple(out_shapes[0]))
  if name == "reshape":
    return dict(p, new_sizes=tuple(out_shapes[0]))
  if name == "iota":
    return dict(p, shape=tuple(out_shapes[0]))
  if name == "split":
    return dict(p, sizes=tuple(s[p["axis"]] for s in out_shapes))
  if name == "slice":
    strides = p["strides"] or (None,) * len(old_in[0])
    limits = tuple(new if _full_range(st, li, sd, old) else li for st, li, sd, old, new in zip(
        p["start_indices"], p["limit_indices"], strides, old_in[0], in_shapes[0]))
    return dict(p, limit_indices=limits)
  if name == "conv_general_dilated" and p["feature_group_count"] > 1:
    spec = p["dimension_numbers"]
    features = in_shapes[0][spec.lhs_spec[1]]
    if not features:  # every input channel removed: G zero-width groups still fit
      return p
    return dict(p, feature_group_count=features // in_shapes[1][spec.rhs_spec[1]])
  return p


def evaluate(prog: Program, variables: Sequence[Any], inputs: Sequence[Any], *,
             consts: Optional[dict] = None, shape_of: Optional[Callable[[int], tuple]] = None,
             record: bool = False):
  """Runs ``prog`` on flat ``variables`` and ``inputs`` leaves.

  Args:
    prog: the program.
    variables, inputs: flat leaves, in ``prog.variables`` / ``prog.inputs`` order.
    consts: replacement constants (value id → array); default ``prog.consts``.
    shape_of: value id → its (new) shape; when given, shape parameters are
      rewritten with :func:`resized_params`.
    record: also return the environment (value id → array).

  Returns:
    The flat outputs (and the environment when ``record``).
  """
  env: dict[int, Any] = dict(prog.consts if consts is None else consts)
  env.update(zip(prog.variables, variables))
  env.update(zip(prog.inputs, inputs))

  def read(i):
    return i.val if isinstance(i, Lit) else env[i]

  for op in prog.ops:
    args = [read(i) for i in op.inputs]
    params = op.params
    if shape_of is not None:
      params = resized_params(
          op, [np.shape(a) for a in args], [shape_of(o) for o in op.outputs],
          [prog.shapes[i] if isinstance(i, int) else () for i in op.inputs])
    out = op.prim.bind(*args, **params)
    out = out if op.prim.multiple_results else [out]
    env.update(zip(op.outputs, out))
  outs = [read(o) for o in prog.outputs]
  return (outs, env) if record else outs


class Recording(NamedTuple):
  """One run of a program, kept: its outputs and chosen intermediate values.

  Attributes:
    outputs: the flat outputs (numpy).
    values: value id → numpy array, for the ids asked for.
    extra: the result of ``record``'s ``extra`` function (numpy leaves), or ``None``.
  """

  outputs: list
  values: dict
  extra: Any


def record(prog: Program, variables: Sequence[Any], inputs: Sequence[Any],
           wanted: Sequence[int], extra: Optional[Callable[[Callable], Any]] = None,
           shape_of: Optional[Callable[[int], tuple]] = None) -> Recording:
  """Runs ``prog`` once (jitted) and returns outputs and chosen intermediate values.

  Args:
    prog: the program.
    variables, inputs: flat leaves.
    wanted: value ids to return (e.g. the activations entering each layer).
    extra: optional ``fn(read)`` computed in the same jitted call from
      ``read(value id)``; its result is returned too.
    shape_of: see :func:`evaluate` (e.g. another batch size).

  Returns:
    A :class:`Recording`.
  """
  wanted = sorted(set(wanted))

  def run(var_leaves, in_leaves):
    outs, env = evaluate(prog, var_leaves, in_leaves, shape_of=shape_of, record=True)
    return outs, [env[i] for i in wanted], extra(env.__getitem__) if extra else None

  outs, values, more = jax.jit(run)(list(variables), list(inputs))
  as_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
  return Recording(as_np(outs), dict(zip(wanted, as_np(values))), as_np(more))
