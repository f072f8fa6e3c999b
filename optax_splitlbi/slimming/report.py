"""The slimming report: per layer, what was removed, what was kept and why."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from optax_splitlbi.slimming.fold import Fold
from optax_splitlbi.slimming.plan import (Classes, Decision, atomic_indices, locks_of,
                                          site_pruned)


def _indices_above(cls: Classes, r: int, i: int) -> dict[int, np.ndarray]:
  """For every class containing atomic index (r, i): its indices that contain it."""
  out = {r: np.asarray([i])}
  todo = [r]
  while todo:
    c = todo.pop()
    for ci, pos in cls.containers.get(c, ()):
      comp = cls.composites[ci]
      sizes = [cls.size[p] for p in comp.parts]
      if comp.kind == "segment":
        idx = sum(sizes[:pos]) + out[c]
      else:
        grids = [np.arange(s) for s in sizes]
        grids[pos] = out[c]
        idx = np.ravel_multi_index(np.meshgrid(*grids, indexing="ij"), sizes).reshape(-1)
      out[comp.coarse] = idx
      todo.append(comp.coarse)
  return out


def _why_kept(cls: Classes, masks: dict, decision: Decision, names: list, r: int,
              i: int) -> list:
  """Reasons atomic channel (r, i) stays although some layer pruned it."""
  locks = locks_of(cls, r)
  if locks:
    return sorted({text for _, text in locks})[:2]
  if i in decision.forced.get(r, ()):
    return ["its constant value reaches a consumer that cannot absorb it exactly "
            "(inexact='keep')"]
  if i in decision.rounded.get(r, ()):
    return [f"the width is rounded up to a multiple of {decision.round_to} (round_to)"]
  keepers = set()
  for c, idx in _indices_above(cls, r, i).items():
    for s in cls.producers.get(c, ()):
      if not np.all(site_pruned(s, masks, cls.size[c])[idx]):
        keepers.add(f"coupled with {names[s.leaf]!r}, which keeps it" if s.leaf is not None
                    else f"{s.why} at {s.where!r}")
  return sorted(keepers) or ["its consumers read it"]


def layer_report(cls: Classes, masks: dict, decision: Decision, names: list,
                 shapes: tuple[list, list]) -> dict:
  """Per kernel leaf: groups before / after and why pruned groups were kept.

  ``shapes``: the dense and the slim shapes of every variable leaf.
  """
  by_leaf = collections.defaultdict(list)
  for r, sites in cls.producers.items():
    for s in sites:
      if s.leaf is not None:
        by_leaf[s.leaf].append((r, s))
  layers = {}
  for leaf, items in sorted(by_leaf.items()):
    for r, s in items:
      n = cls.size[r]
      pruned = site_pruned(s, masks, n)
      kept = np.zeros(n, bool)
      kept[decision.keep[r]] = True
      reasons: collections.Counter = collections.Counter()
      for i in np.flatnonzero(pruned & kept):
        for ar, ai in atomic_indices(cls, r, int(i)):
          for why in _why_kept(cls, masks, decision, names, ar, ai):
            reasons[why] += 1
      key = names[leaf] if len(items) == 1 else f"{names[leaf]}[axis {s.axis}]"
      layers[key] = dict(
          layer=s.where, shape=tuple(shapes[0][leaf]), slim_shape=tuple(shapes[1][leaf]),
          axis=s.axis, groups=n, pruned=int(pruned.sum()), removed=int(n - kept.sum()),
          kept_pruned=int((pruned & kept).sum()), kept_because=dict(reasons))
  return layers


def fold_report(folds: list[Fold], names: list) -> list[dict]:
  """Per fold: the consumer, the variable it went into, its exactness and size."""
  return [dict(consumer=f.consumer, into=None if f.target is None else names[f.target],
               exact=f.exact, max_error=f.max_error, contribution=f.contribution)
          for f in folds]


def param_counts(dense: Any, masked: Any, slim: Any) -> dict:
  """Parameters of the dense, the masked (nonzero) and the slim variables."""
  return dict(dense=count(params_of(dense)), masked=count_nonzero(params_of(masked)),
              slim=count(params_of(slim)))


def max_abs(leaves: list) -> float:
  """Largest absolute entry of a list of arrays."""
  return max((float(np.max(np.abs(a))) for a in leaves if np.size(a)), default=0.)


def count(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def count_nonzero(tree: Any) -> int:
  return int(sum(np.count_nonzero(x) for x in jax.tree.leaves(tree)))


def params_of(variables: Any) -> Any:
  """The ``params`` collection of Linen-style variables, else everything."""
  if isinstance(variables, dict) and "params" in variables:
    return variables["params"]
  return variables


def cost(fn: Callable, *args) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of ``jax.jit(fn)(*args)`` from XLA's cost analysis (NaN
  where there is none; XLA leaves out a count of 0, e.g. the FLOPs of a network slimmed
  to constants)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return (float(analysis.get("flops", 0.0 if analysis else float("nan"))),
          float(analysis.get("bytes accessed", float("nan"))))


def flop_counts(dense_fn: Callable, dense_vars: Any, slim_fn: Callable, slim_vars: Any,
                x: Any) -> dict:
  """XLA FLOPs and bytes accessed of the dense and slim forward passes (batch of ``x``)."""
  (fd, bd), (fs, bs) = cost(dense_fn, dense_vars, x), cost(slim_fn, slim_vars, x)
  return dict(dense=fd, slim=fs, bytes_dense=bd, bytes_slim=bs,
              batch=int(np.shape(jax.tree.leaves(x)[0])[0]))


def format_slim_report(report: dict) -> str:
  """A table of the slimming report (one line per layer, folds, totals)."""
  lines = [f"{'layer':<44} {'groups':>7} {'pruned':>7} {'removed':>8} {'kept':>6}  why kept"]
  for name, r in report["layers"].items():
    why = "; ".join(f"{k} ({v})" for k, v in r["kept_because"].items())
    lines.append(f"{name:<44} {r['groups']:>7} {r['pruned']:>7} {r['removed']:>8} "
                 f"{r['groups'] - r['removed']:>6}  {why}")
  inexact = [f for f in report["folds"] if not f["exact"]]
  lines.append(f"folded constant channels into {len(report['folds'])} consumer(s); "
               f"{len(inexact)} inexact")
  for f in inexact:
    into = f["into"] or "nowhere (no bias after it)"
    lines.append(f"  inexact: {f['consumer']} -> {into}: max error {f['max_error']:.3g} "
                 f"of a contribution up to {f['contribution']:.3g}")
  p = report["params"]
  lines.append(f"parameters: dense {p['dense']:,}, masked nonzero {p['masked']:,}, "
               f"slim {p['slim']:,}")
  if report.get("flops"):
    f = report["flops"]
    lines.append(f"FLOPs (XLA): dense {f['dense']:,.0f}, slim {f['slim']:,.0f} "
                 f"({f['dense'] / max(f['slim'], 1):.2f}x fewer); bytes accessed "
                 f"{f['bytes_dense'] / max(f['bytes_slim'], 1):.2f}x fewer")
  if report.get("max_abs_diff") is not None:
    lines.append(f"max |slim - masked| on the sample: {report['max_abs_diff']:.3g} "
                 f"(outputs up to {report['max_abs_output']:.3g})")
  return "\n".join(lines)
