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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from optax_splitlbi.slimming import replay
from optax_splitlbi.slimming.graph import Contraction, DimGraph
from optax_splitlbi.slimming.plan import Classes, Decision, atomic_indices
from optax_splitlbi.slimming.program import Lit, Program, record

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


class FoldTarget(NamedTuple):
  """Where a consumer's constant contribution ``e`` goes: ``sign · e · Π scales`` is
  added to the variable behind ``bias``.

  Attributes:
    bias: the value id of the bias operand (a variable through layout ops).
    sign: ``-1.0`` where the bias is subtracted (a BatchNorm mean), else ``1.0``.
    scales: ``(operand, divides)`` of the constant scalings on the way.
  """

  bias: int
  sign: float
  scales: list


def fold_target(prog: Program, g: DimGraph, users: dict, producer: dict,
                out: int) -> Optional[FoldTarget]:
  """Follows a consumer's output to the bias it meets (``None``: it meets none)."""
  v, sign, scales = out, 1.0, []
  while True:
    us = users.get(v, ())
    if len(us) != 1:
      return None
    op = prog.ops[us[0]]
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
      return FoldTarget(other, sign * (-1.0 if op.name == "sub" else 1.0), scales)
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


class Folded(NamedTuple):
  """The removed channels' contributions added to the consumers' biases.

  Attributes:
    leaves: the variable leaves with the folds added (numpy copies).
    folds: one :class:`Fold` per consumer that receives a nonzero contribution.
    contributing: for the folds that are inexact or have no target, the atomic
      ``(class, index)`` pairs whose removal caused them.
  """

  leaves: list
  folds: list
  contributing: set


def fold_constants(prog: Program, g: DimGraph, cls: Classes, contribs: dict, env: dict,
                   leaves: list, batch_roots: frozenset, keep: dict) -> Folded:
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
    The :class:`Folded` leaves.
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
    for s, divide in tgt.scales:
      sv = np.asarray(s.val if isinstance(s, Lit) else env[s], np.float64)
      e = e / sv if divide else e * sv
    leaf, axes = g.leaf_of[tgt.bias]
    delta, err = _leaf_delta(tgt.sign * e, axes, leaves[leaf].shape)
    leaves[leaf] = (leaves[leaf] + delta).astype(leaves[leaf].dtype)
    scale = float(np.max(np.abs(e)))  # in the units of the bias it goes into
    exact = err <= _RTOL * scale
    folds.append(Fold(op.where, leaf, exact, 0.0 if exact else err, scale))
    if not exact:
      contributing |= _contributing(prog, g, cls, keep, env, c)
  return Folded(leaves, folds, contributing)


class Folding(NamedTuple):
  """The fold stage's value: the final decision and the folds made for it.

  Attributes:
    decision: the channels removed (less those ``keep_inexact`` brought back).
    leaves: the masked variable leaves with the removed channels' contributions
      added to the consumers' biases.
    folds: one :class:`Fold` per consumer that receives a nonzero contribution.
    reference: the masked dense model's flat outputs on the probe batch.
  """

  decision: Decision
  leaves: list
  folds: list
  reference: list


def fold_removed(prog: Program, cls: Classes, decide: Callable[[Mapping[int, set]], Decision],
                 masked: Sequence[Any], probe: Sequence[Any], batch: replay.BatchAxis,
                 keep_inexact: bool) -> Folding:
  """Decides the removed channels and folds their constant values into the biases.

  The masked model is recorded once on the ``probe`` input leaves. With
  ``keep_inexact``, removed channels behind an inexact fold (or a consumer without a
  bias) are forced back into the network and the decision and folds redone, until
  every fold is exact.

  Args:
    prog, cls: the traced model (with masked variables) and its classes.
    decide: forced keeps (root → indices) → :class:`~.plan.Decision`.
    masked: the masked variable leaves (numpy).
    probe: the input leaves the folds are computed on.
    batch: the batch axis (the contributions must be the same for every example).
    keep_inexact: keep channels that cannot be folded exactly (``inexact="keep"``).

  Returns:
    The :class:`Folding`.
  """
  decision = decide({})
  todo, fn = contribution_fn(prog, cls.graph, cls, decision.keep)
  rec = record(prog, masked, probe, needed_values(prog, cls.graph), extra=fn,
               shape_of=replay.shapes_at_batch(prog, cls, batch, probe))
  contribs = dict(zip(todo, rec.extra))
  while True:
    folded = fold_constants(prog, cls.graph, cls, contribs, rec.values, masked, batch.roots,
                            decision.keep)
    new = {(r, i) for r, i in folded.contributing
           if r in decision.removed and decision.removed[r][i]}
    if not keep_inexact or not new:
      return Folding(decision, folded.leaves, folded.folds, rec.outputs)
    forced = {r: set(idx) for r, idx in decision.forced.items()}
    for r, i in new:
      forced.setdefault(r, set()).add(i)
    decision = decide(forced)
    contribs = contributions(prog, cls.graph, cls, decision.keep, rec.values)
