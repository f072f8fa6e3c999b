"""Folding the removed channels' constant values into the consumers' biases.

In the masked dense model a channel whose every producing filter is pruned is
an input-independent constant (its bias / BatchNorm shift after the
activation); a consumer (the next conv, dense or attention projection) turns it
into a constant *contribution* ``e`` to its output. The slim model drops the
channel, so ``e`` must be added back: it is computed numerically, the
contraction applied to the recorded masked-model activation restricted to the
removed channels, and added to the first bias-like variable the consumer's
output meets (``+ bias``, ``- mean`` of a BatchNorm, through scalings by
constants). When ``e`` is the same at every position (dense layers, 1×1 and
VALID convs, any conv whose window never meets the zero padding) the fold is
exact; otherwise (a zero-padded conv: border positions see fewer taps) the
value at the central position is folded and the fold reported as inexact with
its largest deviation. A consumer without such a bias gets no fold.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from optax_splitlbi.slimming.graph import Contraction, DimGraph
from optax_splitlbi.slimming.plan import Classes, atomic_indices
from optax_splitlbi.slimming.program import Lit, Program

_RTOL = 1e-5
_PASS_THROUGH = ("convert_element_type", "copy", "copy_p", "reduce_precision")


@dataclasses.dataclass(frozen=True)
class Fold:
  """A removed channels' contribution to one consumer, and where it went.

  Attributes:
    consumer: the consumer layer (name stack of the contraction).
    target: index of the variable leaf it was added to, or ``None``.
    exact: the contribution is the same at every position (and was folded).
    max_error: largest |contribution − folded value| (0 when exact).
    contribution: largest |contribution|, in the units of the bias it goes into.
  """

  consumer: str
  target: Optional[int]
  exact: bool
  max_error: float
  contribution: float


def _removed_mask(a_ndim: int, dims, contracted, cls: Classes, keep: dict):
  """Bool array (broadcastable to the activation) of removed contracted positions."""
  mask = None
  for d in contracted:
    r = cls.root(dims[d])
    n, kept = cls.size[r], keep.get(r)
    if kept is None or len(kept) == n:
      continue
    rm = np.ones(n, bool)
    rm[kept] = False
    shape = [1] * a_ndim
    shape[d] = n
    mask = rm.reshape(shape) if mask is None else mask | rm.reshape(shape)
  return mask


def _single_use_chain(prog: Program, users: dict, producer: dict, v: int) -> bool:
  """Whether ``v`` reaches its variable through values read once each."""
  while True:
    if len(users.get(v, ())) != 1:
      return False
    if v in prog.variables:
      return True
    if v not in producer:
      return False
    v = prog.ops[producer[v]].inputs[0]


def fold_target(prog: Program, g: DimGraph, users: dict, producer: dict, out: int):
  """Follows a consumer's output to the bias it meets.

  Returns:
    ``(op index, bias operand id, sign, scale operand ids)`` or ``None``: the
    contribution ``e`` is added to the bias variable as ``sign · e · Π scales``.
  """
  v, sign, scales = out, 1.0, []
  while True:
    us = users.get(v, ())
    if len(us) != 1:
      return None
    k = us[0]
    op = prog.ops[k]
    if op.name in _PASS_THROUGH:
      v = op.outputs[0]
      continue
    if op.name not in ("add", "add_any", "sub", "mul", "div") or op.inputs.count(v) != 1:
      return None
    pos = op.inputs.index(v)
    other = op.inputs[1 - pos]
    if g.is_dependent(other):
      if op.name in ("mul", "div"):
        return None
      sign = -sign if (op.name == "sub" and pos == 1) else sign
    elif op.name in ("mul", "div"):
      if op.name == "div" and pos == 1:
        return None
      scales.append((other, op.name == "div"))
    else:
      if isinstance(other, Lit) or other not in g.leaf_of:
        return None
      if not _single_use_chain(prog, users, producer, other):
        return None
      return k, other, sign * (-1.0 if op.name == "sub" else 1.0), scales
    v = op.outputs[0]


def needed_values(prog: Program, g: DimGraph) -> set:
  """Value ids folding reads: operands of contractions and of scalings."""
  out = set()
  for c in g.contractions:
    out.update(i for i in prog.ops[c.op].inputs if isinstance(i, int))
  for op in prog.ops:
    if op.name in ("mul", "div"):
      out.update(i for i in op.inputs if isinstance(i, int) and not g.is_dependent(i))
  return out


def contribution_fn(prog: Program, g: DimGraph, cls: Classes, keep: dict):
  """The removed channels' part of each consumer's output, as a function.

  Returns:
    ``(contractions, fn)``: ``fn(read)`` computes, from ``read(value id)`` (the
    masked model's values), each listed contraction applied to its activation
    restricted to the removed channels.
  """
  todo, masks = [], []
  for c in g.contractions:
    act = prog.ops[c.op].inputs[c.act]
    mask = _removed_mask(len(prog.shapes[act]), g.of(act), c.contracted, cls, keep)
    if mask is not None:
      todo.append(c)
      masks.append(mask)

  def fn(read):
    outs = []
    for c, m in zip(todo, masks):
      op = prog.ops[c.op]
      args = [i.val if isinstance(i, Lit) else read(i) for i in op.inputs]
      args[c.act] = args[c.act] * m.astype(args[c.act].dtype)
      outs.append(op.prim.bind(*args, **op.params))
    return outs

  return todo, fn


def contributions(prog: Program, g: DimGraph, cls: Classes, keep: dict, env: dict) -> dict:
  """:func:`contribution_fn` evaluated (jitted) on recorded values."""
  todo, fn = contribution_fn(prog, g, cls, keep)
  if not todo:
    return {}
  ids = sorted({i for c in todo for i in prog.ops[c.op].inputs if isinstance(i, int)})
  outs = jax.jit(lambda vals: fn(dict(zip(ids, vals)).__getitem__))([env[i] for i in ids])
  return dict(zip(todo, map(np.asarray, outs)))


def _one_example(e: np.ndarray, dims, cls: Classes, batch_roots: set, where: str):
  """``e`` at the first example, checked to be the same for every example."""
  idx = tuple(slice(0, 1) if cls.root(n) in batch_roots else slice(None) for n in dims)
  e0 = e[idx]
  scale = float(np.max(np.abs(e))) if e.size else 0.0
  if e.size and float(np.max(np.abs(e - e0))) > 1e-4 * max(scale, 1e-30):
    raise RuntimeError(f"slim: the removed channels feeding {where!r} are not constant in "
                       "the masked model; this is a bug in the dependency analysis.")
  return e0, scale


def _leaf_delta(e: np.ndarray, axes, leaf_shape) -> tuple[np.ndarray, float]:
  """Reduces ``e`` (the bias operand's shape) to the leaf's shape at the centre.

  Returns:
    The delta in the leaf's shape and the largest deviation of ``e`` from it.
  """
  keep_axes = [i for i in range(e.ndim) if axes and axes[i] is not None]
  centre = tuple(slice(None) if i in keep_axes else slice(s // 2, s // 2 + 1)
                 for i, s in enumerate(e.shape))
  folded = e[centre]
  err = float(np.max(np.abs(e - folded))) if e.size else 0.0
  arr = folded.reshape([e.shape[i] for i in keep_axes])
  order = [axes[i] for i in keep_axes]
  arr = np.transpose(arr, np.argsort(order)) if order else arr
  shape = [1] * len(leaf_shape)
  for i in keep_axes:
    shape[axes[i]] = e.shape[i]
  return np.broadcast_to(arr.reshape(shape), leaf_shape), err


def _contributing(prog, g, cls, keep, env, c: Contraction) -> set:
  """Atomic (class, index) pairs of removed channels that reach the consumer."""
  op = prog.ops[c.op]
  act, w = op.inputs[c.act], op.inputs[c.weight]
  a = np.asarray(env[act])
  wv = None if isinstance(w, Lit) else np.asarray(env[w])
  out = set()
  for j, d in enumerate(c.contracted):
    r = cls.root(g.of(act)[d])
    kept = keep.get(r)
    if kept is None or len(kept) == cls.size[r]:
      continue
    kept = set(kept.tolist())
    live = np.any(a != 0, axis=tuple(x for x in range(a.ndim) if x != d))
    wd = _weight_axis(op, c, j)
    if wd is not None and wv is not None:
      live &= np.any(wv != 0, axis=tuple(x for x in range(wv.ndim) if x != wd))
    for i in np.flatnonzero(live):
      if int(i) not in kept:
        out.update(atomic_indices(cls, r, int(i)))
  return out


def _weight_axis(op, c: Contraction, j: int) -> Optional[int]:
  """The kernel axis contracted with the activation's ``j``-th contracted dim."""
  if op.name == "dot_general":
    (lc, rc), _ = op.params["dimension_numbers"]
    return (rc if c.act == 0 else lc)[j]
  if op.params.get("feature_group_count", 1) == 1:
    return op.params["dimension_numbers"].rhs_spec[1]
  return None


def fold_constants(prog: Program, g: DimGraph, cls: Classes, contribs: dict, env: dict,
                   leaves: list, batch_roots: set, keep: dict):
  """Adds every consumer's removed-channel contribution to its bias.

  Args:
    prog, g, cls: the traced model and its classes.
    contribs: contraction → its removed channels' contribution (see
      :func:`contributions`).
    env: recorded values of the masked dense model on the sample input.
    leaves: the masked variable leaves (numpy); a copy is returned.
    batch_roots: classes of the inputs' leading (batch) axis.
    keep: root → kept indices (see :func:`.plan.keep_indices`).

  Returns:
    ``(new leaves, folds, contributing)``: ``contributing`` holds, for the folds
    that are inexact or have no target, the atomic (class, index) pairs whose
    removal caused them.
  """
  leaves = [np.array(x) for x in leaves]
  users, producer = prog.users(), prog.producer()
  folds, contributing = [], set()
  for c, e in contribs.items():
    e = np.asarray(e, np.float64)
    op = prog.ops[c.op]
    e, scale = _one_example(e, g.of(op.outputs[0]), cls, batch_roots, op.where)
    if scale == 0.0:
      continue
    tgt = fold_target(prog, g, users, producer, op.outputs[0])
    if tgt is None:
      folds.append(Fold(op.where, None, False, scale, scale))
      contributing |= _contributing(prog, g, cls, keep, env, c)
      continue
    _, other, sign, scales = tgt
    for s, divide in scales:
      sv = np.asarray(s.val if isinstance(s, Lit) else env[s], np.float64)
      e = e / sv if divide else e * sv
    leaf, axes = g.leaf_of[other]
    delta, err = _leaf_delta(sign * e, axes, leaves[leaf].shape)
    leaves[leaf] = (leaves[leaf] + delta).astype(leaves[leaf].dtype)
    scale = float(np.max(np.abs(e)))  # in the units of the bias it goes into
    exact = err <= _RTOL * scale
    folds.append(Fold(op.where, leaf, exact, 0.0 if exact else err, scale))
    if not exact:
      contributing |= _contributing(prog, g, cls, keep, env, c)
  return leaves, folds, contributing
