"""From masks to the channel indices each class of a :class:`DimGraph` keeps.

A channel ``c`` of a class is removable when nothing locks the class and either

- every site that *produces* it has its kernel slice ``c`` pruned by the masks
  (then the channel is an input-independent constant in the masked model,
  whose effect on consumers is folded into their biases), or
- every site that *consumes* it has its kernel slice ``c`` pruned (then no
  one reads it).

A class that is a piece of a composite (a flattened ``H·W·C``, a concatenation,
a head split) sees the sites of the composite: ``c`` is removable only if it is
removable in every composite index it takes part in. The composite's own kept
indices are derived from its pieces (products of kept indices, or the kept
indices of each segment at its offset). :func:`decide` returns the whole
:class:`Decision`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional

import numpy as np

from optax_splitlbi.slimming.graph import DimGraph, Site


@dataclasses.dataclass(frozen=True)
class Composite:
  """A class whose indices are made of other classes' (see the module docstring)."""

  kind: str                # "product" or "segment"
  coarse: int              # class root
  parts: tuple[int, ...]   # class roots, row-major factors or concatenated segments


@dataclasses.dataclass
class Classes:
  """The classes of a graph, keyed by their root node."""

  graph: DimGraph
  size: dict
  composites: list
  containers: dict          # root → [(composite index, position)]
  coarse_of: dict           # root → [composite index]
  producers: dict           # root → [Site]
  consumers: dict
  locks: dict               # root → [(kind, text)]
  unknown: dict             # root → [text]

  def root(self, node: int) -> int:
    return self.graph.find(node)

  def is_atomic(self, r: int) -> bool:
    return not self.coarse_of.get(r)

  def made_two_ways(self, r: int) -> bool:
    """Whether ``r`` is the composite of two different factorizations (its pieces are
    then locked and it keeps all of its indices)."""
    return len({self.composites[ci].parts for ci in self.coarse_of.get(r, ())}) > 1

  def composite(self, r: int) -> Optional[Composite]:
    """The composite whose pieces make ``r``'s indices (and size), or ``None``: ``r`` is
    atomic or made two ways. The one place that says when a class is a composite."""
    cis = self.coarse_of.get(r, ())
    return None if not cis or self.made_two_ways(r) else self.composites[cis[0]]

  def ancestors(self, r: int) -> list[int]:
    """Composite classes that contain ``r`` (transitively), nearest first."""
    out, todo = [], [r]
    while todo:
      for ci, _ in self.containers.get(todo.pop(), ()):
        c = self.composites[ci].coarse
        if c not in out:
          out.append(c)
          todo.append(c)
    return out


def group_classes(g: DimGraph) -> Classes:
  """Collects composites, sites, locks and unknown marks per class root."""
  comps = [Composite("product", g.find(c), tuple(g.find(f) for f in fs)) for c, fs in g.products]
  comps += [Composite("segment", g.find(c), tuple(g.find(f) for f in fs)) for c, fs in g.segments]
  containers, coarse_of = collections.defaultdict(list), collections.defaultdict(list)
  for ci, c in enumerate(comps):
    coarse_of[c.coarse].append(ci)
    for pos, r in enumerate(c.parts):
      containers[r].append((ci, pos))
  by_root = lambda items: _group(items, lambda s: g.find(s.node))  # noqa: E731
  locks, unknown = collections.defaultdict(list), collections.defaultdict(list)
  for n, rs in g.locks.items():
    locks[g.find(n)].extend(rs)
  for n, rs in g.unknown.items():
    unknown[g.find(n)].extend(rs)
  size = {g.find(n): g.size[n] for n in range(len(g.parent))}
  cls = Classes(g, size, comps, dict(containers), dict(coarse_of), by_root(g.producers),
                by_root(g.consumers), locks, unknown)
  for r, cis in coarse_of.items():
    if cls.made_two_ways(r):
      for ci in cis:
        for p in comps[ci].parts:
          cls.locks[p].append(("reshape", "split / merged in two different ways"))
  return cls


def _group(items, key) -> dict:
  out = collections.defaultdict(list)
  for it in items:
    out[key(it)].append(it)
  return dict(out)


def site_pruned(site: Site, masks: dict, n: int) -> np.ndarray:
  """Per channel: is the site's kernel slice entirely pruned?"""
  m = masks.get(site.leaf) if site.leaf is not None else None
  if m is None:
    return np.zeros(n, bool)
  other = tuple(a for a in range(m.ndim) if a != site.axis)
  return ~np.any(m, axis=other)


def _project(arr: np.ndarray, comp: Composite, pos: int, size: dict) -> np.ndarray:
  """An all-indices condition of a composite, seen from its piece ``pos``."""
  if comp.kind == "product":
    shaped = arr.reshape([size[p] for p in comp.parts])
    return np.all(shaped, axis=tuple(a for a in range(len(comp.parts)) if a != pos))
  offset = sum(size[p] for p in comp.parts[:pos])
  return arr[offset:offset + size[comp.parts[pos]]]


def _and(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[np.ndarray]:
  return b if a is None else a if b is None else a & b


def pruned_everywhere(cls: Classes, masks: dict, sites: dict):
  """A function root → per-index AND of ``site_pruned`` over the class's sites and
  those of every composite containing it (projected); ``None`` if there is none."""
  memo: dict = {}

  def up(r: int):
    if r in memo:
      return memo[r]
    acc = None
    for s in sites.get(r, ()):
      acc = _and(acc, site_pruned(s, masks, cls.size[r]))
    for ci, pos in cls.containers.get(r, ()):
      comp = cls.composites[ci]
      above = up(comp.coarse)
      if above is not None:
        acc = _and(acc, _project(above, comp, pos, cls.size))
    memo[r] = acc
    return acc

  return up


def locks_of(cls: Classes, r: int) -> list:
  """Lock reasons of ``r`` and of every composite containing it."""
  return [x for c in [r] + cls.ancestors(r) for x in cls.locks.get(c, ())]


def unknown_of(cls: Classes, r: int) -> list:
  return [x for c in [r] + cls.ancestors(r) for x in cls.unknown.get(c, ())]


def atomic_roots(cls: Classes) -> list[int]:
  """Classes that carry decisions: touched by a site and not a composite."""
  roots = set(cls.producers) | set(cls.consumers)
  todo = list(roots)
  while todo:  # the pieces of composites with sites decide for them
    r = todo.pop()
    for ci in cls.coarse_of.get(r, ()):
      for p in cls.composites[ci].parts:
        if p not in roots:
          roots.add(p)
          todo.append(p)
  return sorted(r for r in roots if cls.is_atomic(r))


def removable(cls: Classes, masks: dict, forced_keep: dict) -> dict:
  """root → bool array of removable channels, for every atomic class with sites.

  Args:
    cls: the classes.
    masks: leaf index → full-shape bool mask (True = kept weight).
    forced_keep: root → set of indices that must stay (see the fold policy).
  """
  prod = pruned_everywhere(cls, masks, cls.producers)
  cons = pruned_everywhere(cls, masks, cls.consumers)
  out = {}
  for r in atomic_roots(cls):
    n = cls.size[r]
    rm = np.zeros(n, bool)
    if not locks_of(cls, r):
      for route in (prod(r), cons(r)):
        if route is not None:
          rm |= route
    for i in forced_keep.get(r, ()):
      rm[i] = False
    out[r] = rm
  return out


def round_up(removed: dict, round_to: int) -> dict:
  """root → removable indices to keep so that each class that loses channels keeps a
  multiple of ``round_to`` of them (at most all): the lowest-index ones.

  Kept channels that the masks prune compute what they compute in the masked
  model (zero weights, a constant), so rounding keeps the slim network exact.
  """
  out = {}
  for r, rm in removed.items():
    kept = rm.size - int(rm.sum())
    extra = min(rm.size, -(-kept // round_to) * round_to) - kept
    if rm.any() and extra > 0:
      out[r] = set(int(i) for i in np.flatnonzero(rm)[:extra])
  return out


def keep_indices(cls: Classes, removed: dict) -> dict:
  """root → sorted kept indices, for the atomic classes and every composite."""
  return compose_indices(cls, {r: np.flatnonzero(~rm) for r, rm in removed.items()},
                         lambda r: cls.size[r])


class Decision(NamedTuple):
  """The decide stage's value: the channels of every class that go and that stay.

  Attributes:
    removed: atomic root → bool per channel, True where it is removed.
    keep: root → sorted kept indices, for every class (composites too).
    forced: root → removable indices kept because their constant value reaches a
      consumer that cannot absorb it exactly (``inexact="keep"``).
    rounded: root → removable indices kept back to round the width (``round_to``).
    round_to: every class that loses channels keeps a multiple of it.
  """

  removed: dict
  keep: dict
  forced: dict
  rounded: dict
  round_to: int


def decide(cls: Classes, masks: Mapping[int, np.ndarray], names: Sequence[str],
           forced: Mapping[int, set], round_to: int) -> Decision:
  """Which channels ``slim`` removes: the removable ones but ``forced`` and those kept
  back for ``round_to``.

  A class may lose every channel: its layers become zero-width (a block's
  attention without heads, an MLP without neurons, a conv without filters) and
  their constant outputs are folded like any other removed channel. The dims
  where zero width is undefined (the model's inputs and outputs, dims reduced
  over such as a LayerNorm's) are locked and keep theirs.

  Raises:
    ValueError: a channel to remove is used by an operation the analysis does not
      know (naming the layers).
  """
  removed = removable(cls, masks, forced)
  _check_removal(cls, removed, names)
  rounded = round_up(removed, round_to)
  for r, idx in rounded.items():
    removed[r][sorted(idx)] = False
  return Decision(removed, keep_indices(cls, removed), dict(forced), rounded, round_to)


def _check_removal(cls: Classes, removed: dict, names: Sequence[str]) -> None:
  for r, rm in removed.items():
    if not rm.any():
      continue
    unknown = unknown_of(cls, r)
    if unknown:
      raise ValueError(
          f"slim: cannot remove channels of {_layers_of(cls, r, names)}: "
          f"{unknown[0]} uses them and the dependency analysis does not understand it.")


def _layers_of(cls: Classes, r: int, names: Sequence[str]) -> str:
  """The variables with a site in class ``r`` or a composite containing it, for messages."""
  sites = [s for c in [r] + cls.ancestors(r) for s in list(cls.producers.get(c, ())) +
           list(cls.consumers.get(c, ())) if s.leaf is not None]
  return ", ".join(repr(n) for n in sorted({names[s.leaf] for s in sites})) or "a dimension"


def compose_indices(cls: Classes, atomic: dict, size) -> dict:
  """root → indices for every class: ``atomic`` gives those of some atomic classes
  (others: all of theirs); a composite's (:meth:`Classes.composite`) are made of its
  pieces' (products of indices, or each segment's at its offset), in a layout where
  class ``r`` has ``size(r)`` entries (the dense sizes when slimming, the wide ones
  when widening)."""
  out: dict = dict(atomic)

  def get(r: int) -> np.ndarray:
    if r in out:
      return out[r]
    comp = cls.composite(r)
    if comp is None:
      out[r] = np.arange(cls.size[r])
      return out[r]
    parts = [get(p) for p in comp.parts]
    if comp.kind == "segment":
      offsets = np.cumsum([0] + [size(p) for p in comp.parts[:-1]])
      out[r] = np.concatenate([o + k for o, k in zip(offsets, parts)])
    else:
      grids = np.meshgrid(*parts, indexing="ij")
      sizes = [size(p) for p in comp.parts]
      out[r] = np.ravel_multi_index(grids, sizes).reshape(-1) if parts else np.arange(1)
    return out[r]

  for r in list(cls.size):
    get(r)
  return out


def atomic_indices(cls: Classes, r: int, i: int) -> list[tuple[int, int]]:
  """The atomic (class, index) pairs that composite index ``i`` of ``r`` is made of
  (through its first factorization where ``r`` is made two ways: those pieces are
  locked, which is why it keeps its channels)."""
  cis = cls.coarse_of.get(r, ())
  if not cis:
    return [(r, i)]
  comp = cls.composites[cis[0]]
  if comp.kind == "segment":
    for p in comp.parts:
      if i < cls.size[p]:
        return atomic_indices(cls, p, i)
      i -= cls.size[p]
    raise IndexError(i)
  idx = np.unravel_index(i, [cls.size[p] for p in comp.parts])
  return [pair for p, j in zip(comp.parts, idx) for pair in atomic_indices(cls, p, int(j))]
