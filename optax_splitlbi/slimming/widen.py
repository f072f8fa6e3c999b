"""Widening: the inverse of slimming. More channels, the same function.

``widen`` traces a network like :func:`~optax_splitlbi.slimming.slim`, finds its
channel classes and appends ``k`` new channels to the classes it is asked to
grow. Every parameter axis of a class grows by ``k`` (at the class's positions
in composite axes: the rows of a dense layer after a flatten interleave, a
concatenation's later segments shift). With ``W`` the widened weights::

    W[new incoming slices]  ~ N(0, σ²)     a producing kernel's new output slices
    W[new outgoing slices]  = 0            a consuming kernel's new input slices
    bias, shift, mean = 0;  scale, var = 1 the parameters attached to a channel

The old channels only read old channels through their old weights and read the
new ones through zeros, so every old value, and the output, is unchanged: the
widened network computes exactly the function of the old one (checked on the
sample input), and gradients on the old entries are the old gradients.
``widen_state`` embeds an optimizer state (SplitLBI's b, V, Γ and entry
record, Adam's moments, ...) in the widened layout so that a SplitLBI path
continues where it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optax_splitlbi import penalties as penalties_lib
from optax_splitlbi.slimming import frameworks
from optax_splitlbi.slimming import groups as groups_lib
from optax_splitlbi.slimming import masks as masks_lib
from optax_splitlbi.slimming import plan as plan_lib
from optax_splitlbi.slimming import replay
from optax_splitlbi.slimming.graph import build_graph
from optax_splitlbi.slimming.program import trace

Key = Union[str, tuple]
_INITS = ("fan_in", "match")  # and callables
# New entries of a parameter no kernel contracts (biases, norm parameters,
# running statistics), by the last name of its path; others get 0.
_ATTACHED_FILL = {"scale": 1.0, "var": 1.0, "variance": 1.0}


@dataclasses.dataclass(frozen=True)
class WideModel:
  """A widened network (see :func:`widen`).

  Attributes:
    variables: the widened variables, in the structure of the input ``variables``.
    apply_fn: jitted ``apply_fn(variables, x)`` replaying the traced forward pass
      at the widened shapes (any model the analysis understands; differentiable).
    index: per variable leaf (the input structure), a tuple with, per axis, the
      positions of the old entries in the widened axis (``None``: not widened).
    classes: ``{key of extra: (old size, new size)}`` of the widened classes.
    max_abs_diff: largest difference between the widened and the old network's
      outputs on (up to 4 examples of) the sample input; ``None`` unverified.
    module: the widened Linen / NNX module (``widen_linen`` / ``widen_nnx``).
  """

  variables: Any
  apply_fn: Callable
  index: Any
  classes: dict
  max_abs_diff: Optional[float] = None
  module: Any = None

  def _part(self, tree: Any) -> tuple[Any, Any]:
    """(index, variables) of the part of the variables ``tree`` is shaped like."""
    if _fits(tree, self.index):
      return self.index, self.variables
    if isinstance(self.index, Mapping) and "params" in self.index and _fits(
        tree, self.index["params"]):
      return self.index["params"], self.variables["params"]
    raise ValueError("WideModel: the tree has neither the structure of the variables nor "
                     "that of variables['params'].")

  def params_index(self, tree: Any) -> Any:
    """``index`` for ``tree``: that of the whole variables or of their ``"params"``."""
    return self._part(tree)[0]

  def embed(self, old: Any, new: Any) -> Any:
    """``new`` (widened shapes) with ``old`` (old shapes) at the old positions.

    Args:
      old: a tree shaped like the old variables or their ``"params"``; keepdims
        layouts (size 1 on an axis that ``new`` also has at size 1) are fine.
      new: the same structure at the widened shapes; its values stay at the
        new positions.

    Returns:
      The embedded tree (numpy arrays).
    """
    treedef = jax.tree.structure(new)
    index = treedef.flatten_up_to(self.params_index(new))
    out = [embed_array(o, n, idx) for o, n, idx in
           zip(treedef.flatten_up_to(old), jax.tree.leaves(new), index)]
    return treedef.unflatten(out)

  def grow(self, tree: Any, fill: float = 0) -> Any:
    """``tree`` (old shapes) at the widened shapes, ``fill`` at the new entries.

    Args:
      tree: shaped like the old variables or their ``"params"`` (masks, a
        gradient, ...); a keepdims size-1 axis stays 1.
      fill: the value of the new entries.

    Returns:
      The grown tree (numpy arrays).
    """
    index, variables = self._part(tree)
    treedef = jax.tree.structure(tree)
    out = []
    for x, idx, v in zip(jax.tree.leaves(tree), treedef.flatten_up_to(index),
                         treedef.flatten_up_to(variables)):
      x = np.asarray(x)
      shape = tuple(n if p is not None and len(p) == s else s
                    for s, p, n in zip(x.shape, idx, np.shape(v)))
      out.append(embed_array(x, np.full(shape, fill, x.dtype), idx))
    return treedef.unflatten(out)


def old_entries(wide: "WideModel", tree: Any) -> Any:
  """The entries at the old positions of every leaf of ``tree`` (widened shapes) that
  belongs to a parameter (its path ends in the parameter's path: params, updates,
  an optimizer state's b, V, Γ, ...); other leaves unchanged. The inverse of
  :func:`widen_state`'s embedding, e.g. to compare a widened run with the old one."""
  params = _param_paths(wide)

  def cut(path, x):
    index = _index_of(masks_lib.strip_value(penalties_lib.path_str(path)), params)
    if index is None or np.ndim(x) != len(index):
      return x
    x = np.asarray(x)
    for axis, (n, idx) in enumerate(zip(x.shape, index)):
      if idx is not None and n > len(idx):
        x = np.take(x, idx, axis=axis)
    return x

  return jax.tree_util.tree_map_with_path(cut, tree)


def _fits(tree: Any, index: Any) -> bool:
  try:
    jax.tree.structure(tree).flatten_up_to(index)
    return True
  except (ValueError, TypeError):
    return False


def embed_array(old, new, positions: tuple) -> np.ndarray:
  """``new`` with ``old`` written at ``positions`` (per axis; ``None``: the same
  positions, as on an axis where both have one entry or the same size).

  Raises:
    ValueError: shapes that ``positions`` does not relate.
  """
  old, out = np.asarray(old), np.array(new, copy=True)
  if old.ndim != out.ndim or len(positions) != out.ndim:
    raise ValueError(f"embed: shapes {old.shape} and {out.shape} do not match the index.")
  idx = []
  for s, n, p in zip(old.shape, out.shape, positions):
    if s == n:
      idx.append(np.arange(n))
    elif p is not None and len(p) == s and (len(p) == 0 or p.max() < n):
      idx.append(p)
    else:
      raise ValueError(f"embed: an axis of size {s} does not fit one of size {n}.")
  out[np.ix_(*idx)] = old.astype(out.dtype)
  return out


# ----------------------------------------------------------------- which classes


def _resolve(extra: Mapping, cls: plan_lib.Classes, prog, variables: Any) -> dict:
  """root → (label, channels to add) for the classes ``extra`` names.

  A key is a class name of :func:`~optax_splitlbi.channel_groups`, a kernel's
  path (its one output axis) or a ``(path, axis)`` pair of any parameter axis.
  """
  params = groups_lib.params_of(variables)
  names = {name: r for r, (name, _) in groups_lib.named_classes(cls, prog, params).items()}
  full = masks_lib.leaf_paths(variables)
  by_path = {}
  for k, name in enumerate(full):
    by_path[masks_lib.strip_value(name)] = k
    if k in params.paths:
      by_path.setdefault(params.paths[k], k)
  outputs: dict = {}
  for s in cls.graph.producers:
    if s.leaf is not None:
      outputs.setdefault(s.leaf, set()).add(s.axis)
  out = {}
  for key, k in extra.items():
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
      raise ValueError(f"widen: extra[{key!r}] must be a non-negative int, got {k!r}.")
    r = _root_of(key, names, by_path, outputs, cls, prog)
    if r in out:
      raise ValueError(f"widen: {key!r} and {out[r][0]!r} name the same channel class.")
    _check_growable(cls, r, key)
    out[r] = (key, int(k))
  return {r: v for r, v in out.items() if v[1]}


def _root_of(key: Key, names: dict, by_path: dict, outputs: dict, cls, prog) -> int:
  if isinstance(key, str) and key in names:
    return names[key]
  path, axis = (key if isinstance(key, tuple) and len(key) == 2 else (key, None))
  leaf = by_path.get(masks_lib.strip_value(path)) if isinstance(path, str) else None
  if leaf is None:
    raise ValueError(f"widen: {key!r} names no channel class ({sorted(names)[:8]}...) and no "
                     "variable leaf; give a class name, a kernel path or (path, axis).")
  dims = cls.graph.dims[prog.variables[leaf]]
  if axis is None:
    axes = sorted(outputs.get(leaf, ()))
    if len(axes) != 1:
      raise ValueError(f"widen: {path!r} has {len(axes)} output axes {axes}; name one as "
                       f"({path!r}, axis).")
    axis = axes[0]
  if not isinstance(axis, int) or not 0 <= axis < len(dims):
    raise ValueError(f"widen: axis {axis!r} of {path!r} is not an axis of its shape "
                     f"{prog.shapes[prog.variables[leaf]]}.")
  r = cls.root(dims[axis])
  if not cls.is_atomic(r):
    raise ValueError(f"widen: axis {axis} of {path!r} is a composite (flattened or "
                     "concatenated) dimension; widen one of its pieces' classes.")
  return r


def _check_growable(cls: plan_lib.Classes, r: int, key: Key) -> None:
  locks, unknown = plan_lib.locks_of(cls, r), plan_lib.unknown_of(cls, r)
  if locks:
    raise ValueError(f"widen: the channels of {key!r} cannot grow: {locks[0][1]}.")
  if unknown:
    raise ValueError(f"widen: the channels of {key!r} cannot grow: {unknown[0]} uses them and "
                     "the dependency analysis does not understand it.")
  computed = [s for s in cls.producers.get(r, ()) if s.leaf is None]
  if not cls.producers.get(r) or computed:
    raise ValueError(f"widen: the channels of {key!r} are not produced by parameter kernels "
                     "only, so new channels would not start from their own weights.")


# -------------------------------------------------------------- the new arrays


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The widened layout: new shape and old positions of every variable leaf.

  Attributes:
    shapes: per variable leaf, its widened shape.
    index: per variable leaf, per axis, the old positions (``None``: same size).
    outputs: per variable leaf, the axes on which a kernel produces channels.
  """

  shapes: list
  index: list
  outputs: list


def _layout(cls: plan_lib.Classes, prog, grown: dict) -> _Layout:
  size = replay.class_sizes(cls, {}, {r: cls.size[r] + k for r, (_, k) in grown.items()})
  positions = plan_lib.compose_indices(cls, {r: np.arange(cls.size[r]) for r in grown}, size)
  outputs = [set() for _ in prog.variables]
  for s in cls.graph.producers:
    if s.leaf is not None:
      outputs[s.leaf].add(s.axis)
  shapes, index = [], []
  for v in prog.variables:
    roots = [cls.root(n) for n in cls.graph.dims[v]]
    shapes.append(tuple(size(r) for r in roots))
    index.append(tuple(None if size(r) == cls.size[r] else positions[r] for r in roots))
  for v, c in prog.consts.items():
    if any(size(cls.root(n)) != cls.size[cls.root(n)] for n in cls.graph.dims[v]):
      raise ValueError(f"widen: a constant of shape {np.shape(c)} in the forward pass has a "
                       "grown dimension; the traced program cannot be replayed wider.")
  return _Layout(shapes, index, outputs)


def _new_entries(index: tuple, shape: tuple, axes) -> np.ndarray:
  """Bool array: the entries whose index is new along any of ``axes``."""
  new = np.zeros(shape, bool)
  for a in axes:
    if index[a] is None:
      continue
    along = np.ones(shape[a], bool)
    along[index[a]] = False
    new |= along.reshape([-1 if b == a else 1 for b in range(len(shape))])
  return new


def _fan_in_draw(key: jax.Array, shape: tuple, outputs: set, dtype) -> np.ndarray:
  """Flax's default (LeCun) initialisation: truncated normal, variance 1 / fan-in,
  the fan-in being the product of the axes that do not produce channels."""
  fan_in = math.prod(n for a, n in enumerate(shape) if a not in outputs) or 1
  std = math.sqrt(1.0 / fan_in) / .87962566103423978  # the truncation's std
  return np.asarray(jax.random.truncated_normal(key, -2.0, 2.0, shape) * std, dtype)


def _widen_leaf(x, name: str, shape: tuple, index: tuple, outputs: set, draw) -> np.ndarray:
  """One variable at the wide shape: old entries kept, new outgoing entries zero,
  new channels' incoming entries drawn, other new entries (attached) filled."""
  x = np.asarray(x)
  if all(i is None for i in index):
    return x
  fill = _ATTACHED_FILL.get(masks_lib.strip_value(name).rsplit("/", 1)[-1], 0.0)
  out = embed_array(x, np.full(shape, fill if not outputs else 0.0, x.dtype), index)
  incoming = _new_entries(index, shape, outputs)
  if incoming.any():
    out = np.where(incoming, draw(shape, outputs, x), out)
  return out


def _drawer(init: Union[str, Callable], key: Optional[jax.Array], layout: _Layout, treedef,
            names: list) -> Callable[[int], Callable]:
  """leaf index → ``draw(shape, outputs, old)``: the new channels' incoming weights."""
  if callable(init):
    fresh = treedef.flatten_up_to(init(treedef.unflatten(layout.shapes)))

    def from_fresh(i):
      def draw(shape, outputs, old):
        if np.shape(fresh[i]) != shape:
          raise ValueError(f"widen: init gave {names[i]!r} the shape {np.shape(fresh[i])}, "
                           f"not the widened {shape}.")
        return np.asarray(fresh[i], old.dtype)
      return draw
    return from_fresh
  if init not in _INITS:
    raise ValueError(f"widen: init must be one of {_INITS} or a callable, got {init!r}.")
  if key is None:
    raise ValueError("widen: init={init!r} draws new weights and needs a PRNG key (key=...).")
  keys = jax.random.split(key, len(layout.shapes))

  def per_leaf(i):
    def draw(shape, outputs, old):
      if init == "fan_in":
        return _fan_in_draw(keys[i], shape, outputs, old.dtype)
      std = float(np.std(old)) if old.size else 0.0
      return np.asarray(jax.random.normal(keys[i], shape) * std, old.dtype)
    return draw
  return per_leaf


def widen(apply_fn: Callable[[Any, Any], Any], variables: Any, extra: Mapping[Key, int],
          sample_input: Any, *, key: Optional[jax.Array] = None,
          init: Union[str, Callable[[Any], Any]] = "fan_in", verify: bool = True) -> WideModel:
  """Adds channels to a network without changing the function it computes.

  The forward pass is traced and analysed as by :func:`slim`; each class named
  in ``extra`` (a residual stage's channels, a layer's filters, attention heads)
  gets ``extra[key]`` new channels, appended after the old ones on every axis
  that indexes the class (at the class's positions in flattened or concatenated
  axes). With ``W`` the old and ``W'`` the widened weights::

      W'[old entries]                       = W
      W'[new channel's incoming weights]    ~ init          (kernels producing it)
      W'[old channel's weights from new]    = 0             (kernels reading it)
      bias, shift, mean = 0; scale, var = 1                 (attached entries)

  Old channels read new ones only through zeros, so every old activation and
  the output are unchanged, and so are the gradients of the old entries.

  Args:
    apply_fn: ``(variables, x) -> outputs``, e.g. ``lambda v, x: model.apply(v, x,
      train=False)``.
    variables: the model's variables.
    extra: ``{key: channels to add}``; a key is a class name of
      :func:`~optax_splitlbi.channel_groups` (``"Conv_0"``, ``"BasicBlock_1/Conv_1"``),
      a kernel's path (its output axis) or ``(path, axis)``.
    sample_input: an input batch, for tracing and to check the function.
    key: PRNG key for the new incoming weights.
    init: ``"fan_in"``: Flax's default LeCun normal (variance 1 / fan-in, the
      fan-in at the widened shape); ``"match"``: normal with the standard
      deviation of the layer's current weights; or ``init(shapes) -> variables``
      giving variables at the widened shapes (``shapes``: a tree of shape tuples
      like ``variables``) whose new incoming entries are used, e.g. the widened
      module's own ``init`` (:func:`widen_linen`).
    verify: compare the widened and the old network's outputs on (up to 4
      examples of) ``sample_input``; a difference is an error.

  Returns:
    A :class:`WideModel`.

  Raises:
    ValueError: a key that names no class, a class that cannot grow (the model's
      input or output, a reshape that splits it two ways, an operation the
      analysis does not know), or widening that changes the outputs (a grown
      class read by an operation that mixes channels, as a LayerNorm over them).
  """
  leaves, treedef = jax.tree.flatten(variables)
  names = masks_lib.leaf_paths(variables)
  prog = trace(apply_fn, variables, sample_input)
  cls = plan_lib.group_classes(build_graph(prog))
  grown = _resolve(extra, cls, prog, variables)
  layout = _layout(cls, prog, grown)
  draw = _drawer(init, key, layout, treedef, names)
  wide = [_widen_leaf(x, names[i], layout.shapes[i], layout.index[i], layout.outputs[i], draw(i))
          for i, x in enumerate(leaves)]
  wide_vars = treedef.unflatten(jax.device_put(wide))
  batch = replay.batch_axis(prog, cls)
  keep = {r: np.arange(cls.size[r] + k) for r, (_, k) in grown.items()}
  wide_apply = replay.make_apply(prog, cls, keep, prog.consts, batch)
  diff = None
  if verify:
    probe = replay.sub_batch(sample_input, batch.resizable)
    before = jax.tree.leaves(apply_fn(variables, probe))
    diff = replay.max_diff(jax.tree.leaves(wide_apply(wide_vars, probe)), before)
    scale = max((float(np.max(np.abs(a))) for a in before if np.size(a)), default=0.0)
    if diff > 1e-5 * max(1.0, scale):
      raise ValueError(
          f"widen: growing {[label for label, _ in grown.values()]} changes the network's "
          f"outputs (max difference {diff:.3g}, largest output {scale:.3g}): a grown class "
          "is read by an operation that mixes its channels (a LayerNorm over them, a "
          "product of two activations); grow another class.")
  classes = {label: (int(cls.size[r]), int(cls.size[r] + k)) for r, (label, k) in grown.items()}
  return WideModel(wide_vars, wide_apply, treedef.unflatten(layout.index), classes, diff)


# ------------------------------------------------------------------ Flax modules


def widen_linen(model, variables: Any, extra: Mapping[Key, int], sample_input: Any, *,
                key: jax.Array, init: str = "module", verify: bool = True,
                **apply_kwargs) -> WideModel:
  """:func:`widen` for a Linen module; also rebuilds the module at the new widths.

  The module must define ``resized(shapes)`` (as for :func:`slim_linen`).

  Args:
    model: the Linen module.
    variables: its variables (``params``, ``batch_stats``).
    extra, sample_input, verify: see :func:`widen`.
    key: PRNG key for the new weights.
    init: ``"module"`` (default): new incoming weights from the widened module's
      own initializers (``resized(...).init(key, ...)``): the layer's
      initialisation scale; or any ``init`` of :func:`widen`.
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    A :class:`WideModel` whose ``module`` is the widened Linen module.
  """
  if not hasattr(model, "resized"):
    raise TypeError(f"widen_linen: {type(model).__name__} has no resized(shapes) method; add "
                    "one (docs/slimming.md) or use widen(), whose apply_fn runs any model.")

  def module_init(shapes):
    return model.resized(shapes["params"]).init(key, sample_input, **apply_kwargs)

  res = widen(lambda v, x: model.apply(v, x, **apply_kwargs), variables, extra, sample_input,
              key=key, init=module_init if init == "module" else init, verify=verify)
  new = model.resized(jax.tree.map(np.shape, res.variables["params"]))
  if verify:
    probe = replay.sub_batch(sample_input, True)
    frameworks.check_same_outputs(
        res.apply_fn(res.variables, probe),
        jax.jit(lambda v, x: new.apply(v, x, **apply_kwargs))(res.variables, probe),
        f"widen_linen: {type(model).__name__}.resized(...)")
  return dataclasses.replace(res, module=new)


def widen_nnx(model, extra: Mapping[Key, int], sample_input: Any, *, key: jax.Array,
              init: str = "fan_in", verify: bool = True) -> WideModel:
  """:func:`widen` for a Flax NNX module: a new module holding the widened arrays.

  Every ``nnx.Variable`` grows and the feature attributes of the standard layers
  are set from the new shapes (as by :func:`slim_nnx`); ``model`` is not changed.
  Call it with the model in eval mode (``model.eval()``).

  Args:
    model: the NNX module, called as ``model(x)``.
    extra, sample_input, key, init, verify: see :func:`widen` (``"fan_in"`` is
      the default initialisation of ``nnx.Linear`` / ``nnx.Conv``).

  Returns:
    A :class:`WideModel` whose ``module`` is the new NNX module and whose
    ``variables`` are ``{"params": State, "rest": State}``.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  apply_fn, variables, rebuild = frameworks.nnx_functional(model)
  res = widen(apply_fn, variables, extra, sample_input, key=key, init=init, verify=verify)
  new = rebuild(res.variables)
  if verify:
    probe = replay.sub_batch(sample_input, True)
    frameworks.check_same_outputs(
        res.apply_fn(res.variables, probe), nnx.jit(lambda m, x: m(x))(new, probe),
        f"widen_nnx: the rebuilt {type(model).__name__}")
  return dataclasses.replace(res, module=new)


# -------------------------------------------------------------- optimizer state


def _param_paths(wide: WideModel) -> dict:
  """Path string (no trailing ``/value``) → index tuple of every params leaf."""
  tree = wide.variables
  index = wide.index
  if isinstance(tree, Mapping) and "params" in tree:
    tree, index = tree["params"], index["params"]
  paths = [masks_lib.strip_value(p) for p in masks_lib.leaf_paths(tree)]
  return dict(zip(paths, jax.tree.structure(tree).flatten_up_to(index)))


def _index_of(path: str, params: dict) -> Optional[tuple]:
  """The index of the longest params path that ``path`` ends with."""
  best = None
  for p, idx in params.items():
    if (path == p or path.endswith("/" + p)) and (best is None or len(p) > len(best)):
      best = p
  return None if best is None else params[best]


def widen_state(wide: WideModel, state: Any, fresh: Any) -> Any:
  """An optimizer state at the widened shapes that continues the old one.

  Every leaf of ``state`` that belongs to a parameter (found by its path ending
  in the parameter's path: SplitLBI's b, V, Γ and entry steps, Adam's moments,
  in chains and under ``inject_hyperparams``) is embedded in the matching leaf of
  ``fresh``, the new optimizer's ``init`` of the widened params; so new entries
  hold their initial values (b, V, Γ zero, entry step −1) and the SplitLBI path
  continues on the old ones. Other leaves (step counts, thresholds, injected
  hyperparameters) are taken from ``state``. Leaves keep ``fresh``'s sharding.

  Args:
    wide: the :class:`WideModel`.
    state: the optimizer state of the old params.
    fresh: ``tx.init(wide params)`` of the optimizer that continues (for cross-leaf
      groups, with the penalty of the widened model: its classes are larger).

  Returns:
    The widened state, with the structure of ``fresh``.

  Raises:
    ValueError: states whose structures differ, or a leaf that fits neither.
  """
  params = _param_paths(wide)
  old_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  new_leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
  if [p for p, _ in old_leaves] != [p for p, _ in new_leaves]:
    raise ValueError("widen_state: the old state and fresh do not have the same tree "
                     "structure (the same optimizer, built for the widened params?).")
  out = []
  for (path, old), (_, new) in zip(old_leaves, new_leaves):
    name = masks_lib.strip_value(penalties_lib.path_str(path))
    if np.shape(old) == np.shape(new):
      x = np.asarray(old)
    else:
      index = _index_of(name, params)
      if index is None or np.ndim(old) != len(index):
        raise ValueError(f"widen_state: leaf {name!r} changed shape {np.shape(old)} → "
                         f"{np.shape(new)} but belongs to no widened parameter.")
      x = embed_array(old, np.asarray(new), index)
    sharding = getattr(new, "sharding", None)
    out.append(jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x))
  return jax.tree.unflatten(treedef, out)
