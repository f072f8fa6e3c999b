"""Replaying a traced program at other shapes: the slim (or wide) network, other batches.

Every value's shape is a tuple of class sizes; cutting a class to its kept indices
(slimming), growing it (widening) or giving the inputs' leading axis another length
(a new batch) changes the sizes, and :func:`~.program.evaluate` reruns the program
at them. The batch axis may change only where nothing ties it to a variable, a
constant or a fixed-size operation; :class:`BatchAxis` says which.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from optax_splitlbi.slimming import plan as plan_lib
from optax_splitlbi.slimming.program import Program, evaluate


def class_sizes(cls: plan_lib.Classes, keep: Mapping[int, np.ndarray],
                override: Mapping[int, int]) -> Callable[[int], int]:
  """root → size: ``override`` (new sizes of some atomic classes, e.g. the batch), else
  the number of ``keep`` indices (else the dense size); a composite's from its pieces'."""
  memo: dict = dict(override)

  def size(r: int) -> int:
    if r not in memo:
      comp = cls.composite(r)
      if comp is None:
        memo[r] = len(keep[r]) if r in keep else cls.size[r]
      else:
        sizes = [size(p) for p in comp.parts]
        memo[r] = int(np.prod(sizes)) if comp.kind == "product" else int(sum(sizes))
    return memo[r]

  return size


def leading_size(leaves: Sequence[Any]) -> Optional[int]:
  """The leading (batch) axis length of the first leaf, ``None`` for a scalar or none."""
  return np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else None


class BatchAxis(NamedTuple):
  """The inputs' leading (batch) axis in the traced program.

  Attributes:
    roots: the classes of every input's leading axis.
    size: its length in the trace (``None``: scalar inputs).
    fixed: why another batch size cannot be replayed, ``None`` when it can.
  """

  roots: frozenset
  size: Optional[int]
  fixed: Optional[str]

  @property
  def resizable(self) -> bool:
    return self.fixed is None


def batch_axis(prog: Program, cls: plan_lib.Classes) -> BatchAxis:
  """The :class:`BatchAxis` of a traced program."""
  g = cls.graph
  roots = frozenset(cls.root(g.of(v)[0]) for v in prog.inputs if prog.shapes[v])
  size = next((prog.shapes[v][0] for v in prog.inputs if prog.shapes[v]), None)
  return BatchAxis(roots, size, _fixed_reason(prog, cls, roots))


def _fixed_reason(prog: Program, cls: plan_lib.Classes, batch: frozenset) -> Optional[str]:
  """Why the batch classes cannot take another size (``None`` if they can)."""
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


def shapes_at_batch(prog: Program, cls: plan_lib.Classes, batch: BatchAxis,
                    x_leaves: Sequence[Any]) -> Optional[Callable[[int], tuple]]:
  """Dense value shapes with the batch axis at the length of ``x_leaves`` (``None``:
  the traced shapes)."""
  b = leading_size(x_leaves)
  if b is None or b == batch.size:
    return None
  size = class_sizes(cls, {}, {r: b for r in batch.roots})
  return lambda v: tuple(size(cls.root(n)) for n in cls.graph.dims[v])


def sub_batch(x: Any, resizable: bool, n: int = 4) -> Any:
  """The first ``n`` examples of ``x`` when the model allows another batch size."""
  leaves = jax.tree.leaves(x)
  if not resizable or not leaves or any(np.ndim(a) == 0 for a in leaves):
    return x
  return jax.tree.map(lambda a: a[:n], x)


def max_diff(a_leaves: Sequence[Any], b_leaves: Sequence[Any]) -> float:
  """Largest absolute difference between two lists of arrays."""
  return max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
              for a, b in zip(a_leaves, b_leaves) if np.size(a)), default=0.0)


def make_apply(prog: Program, cls: plan_lib.Classes, keep: Mapping[int, np.ndarray],
               consts: Mapping[int, Any], batch: BatchAxis) -> Callable:
  """Jitted ``apply(variables, x)``: ``prog`` replayed with every class cut to ``keep``
  (or grown to it), at the batch size of ``x`` when the batch is resizable."""
  roots = [tuple(cls.root(n) for n in cls.graph.dims[v]) for v in range(len(prog.shapes))]
  n_vars = len(prog.variables)

  def apply(variables, x):
    var_leaves, x_leaves = jax.tree.leaves(variables), jax.tree.leaves(x)
    if len(var_leaves) != n_vars:
      raise ValueError(f"slim apply_fn: expected {n_vars} variable leaves, got "
                       f"{len(var_leaves)}.")
    b = leading_size(x_leaves)
    override = {}
    if b is not None and b != batch.size:
      if batch.fixed is not None:
        raise ValueError(f"slim apply_fn: traced at batch {batch.size}, called with {b}; "
                         f"the batch axis is {batch.fixed}, so the batch size is fixed.")
      override = {r: b for r in batch.roots}
    size = class_sizes(cls, keep, override)
    shape_of = lambda v: tuple(size(r) for r in roots[v])  # noqa: E731
    outs = evaluate(prog, var_leaves, x_leaves, consts=consts, shape_of=shape_of)
    return jax.tree.unflatten(prog.out_tree, outs)

  return jax.jit(apply)


def _cut(x: Any, dims: Sequence[int], cls: plan_lib.Classes,
         keep: Mapping[int, np.ndarray]) -> tuple[np.ndarray, tuple]:
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


class SlimProgram(NamedTuple):
  """The last stage's value: the traced program at the slim shapes.

  Attributes:
    leaves: the slim variable leaves (numpy), in ``prog.variables`` order.
    kept: per leaf, per axis, the kept indices (``None``: all kept).
    apply: jitted ``apply(variables, x)`` running the slim network.
  """

  leaves: list
  kept: list
  apply: Callable


def slim_program(prog: Program, cls: plan_lib.Classes, keep: Mapping[int, np.ndarray],
                 leaves: Sequence[Any], batch: BatchAxis) -> SlimProgram:
  """Cuts the (folded) variable leaves and the constants to ``keep``; the replay."""
  cut = [_cut(x, cls.graph.dims[v], cls, keep) for v, x in zip(prog.variables, leaves)]
  consts = {v: _cut(c, cls.graph.dims[v], cls, keep)[0] for v, c in prog.consts.items()}
  return SlimProgram([x for x, _ in cut], [k for _, k in cut],
                     make_apply(prog, cls, keep, consts, batch))
