"""Slimming Flax modules: ``slim_linen`` rebuilds a Linen module at the slim widths,
``slim_nnx`` makes a new NNX module holding the slim arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from optax_splitlbi.slimming.api import SlimModel, slim
from optax_splitlbi.slimming.masks import leaf_paths
from optax_splitlbi.slimming.replay import sub_batch


def check_same_outputs(expected: Any, got: Any, what: str) -> None:
  """Raises a ValueError naming ``what`` where ``got`` differs from ``expected``."""
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max())):
      raise ValueError(f"{what} does not compute the slim network (max difference "
                       f"{np.abs(a - b).max() if a.shape == b.shape else 'shape'}).")


def slim_linen(model, variables: Any, masks: Any, sample_input: Any, *, inexact: str = "fold",
               count_flops: bool = True, verify: bool = True, round_to: int = 1,
               **apply_kwargs) -> SlimModel:
  """:func:`slim` for a Linen module; also rebuilds the module at the slim widths.

  The module must define ``resized(self, shapes) -> nn.Module``: given the slim
  params' shapes (a params-structured tree of shape tuples) it returns a copy
  of itself whose layers have those widths (the example models do; see
  docs/slimming.md). The rebuilt module's parameter shapes and outputs are
  checked against the slim network.

  Args:
    model: the Linen module.
    variables: ``model.init(...)``-style variables (``params``, ``batch_stats``).
    masks: see :func:`slim` (params-structured).
    sample_input: an input batch.
    inexact, count_flops, round_to: see :func:`slim`.
    verify: as in :func:`slim`, and check the rebuilt module's outputs.
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    A :class:`SlimModel` whose ``module`` is the slim Linen module.
  """
  if not hasattr(model, "resized"):
    raise TypeError(f"slim_linen: {type(model).__name__} has no resized(shapes) method; add "
                    "one (docs/slimming.md) or use slim(), whose apply_fn runs any model.")
  res = slim(lambda v, x: model.apply(v, x, **apply_kwargs), variables, masks, sample_input,
             inexact=inexact, count_flops=count_flops, verify=verify, round_to=round_to)
  new = model.resized(jax.tree.map(np.shape, res.variables["params"]))
  init = _init_shapes(model, new, res.variables["params"], sample_input, apply_kwargs)
  want = {k: jax.tree.map(np.shape, v) for k, v in res.variables.items()}
  got = {k: jax.tree.map(lambda a: a.shape, init[k]) for k in want if k in init}
  if got != want:
    bad = [n for n, a, b in zip(leaf_paths(want), jax.tree.leaves(want), jax.tree.leaves(got))
           if a != b] if jax.tree.structure(got) == jax.tree.structure(want) else ["structure"]
    raise ValueError(f"slim_linen: {type(model).__name__}.resized built a module whose "
                     f"variables differ from the slim ones at {bad[:3]}.")
  if not verify:
    return dataclasses.replace(res, module=new)
  probe = sub_batch(sample_input, res.report["batch_resizable"])
  check_same_outputs(
      res.apply_fn(res.variables, probe),
      jax.jit(lambda v, x: new.apply(v, x, **apply_kwargs))(res.variables, probe),
      f"slim_linen: {type(model).__name__}.resized(...)")
  return dataclasses.replace(res, module=new)


def _init_shapes(model, new, slim_params: Any, sample_input: Any, apply_kwargs: dict) -> Any:
  """The variable shapes of ``new.init``; a ValueError naming the zero-width variables
  where an initializer divides by zero (Flax's variance scaling at fan-in / out 0)."""
  try:
    return jax.eval_shape(lambda: new.init(jax.random.key(0), sample_input, **apply_kwargs))
  except ZeroDivisionError as e:
    empty = [n for n, a in zip(leaf_paths(slim_params), jax.tree.leaves(slim_params))
             if not np.size(a)]
    raise ValueError(
        f"slim_linen: {type(model).__name__}.resized(...).init fails ({e}) at the zero-width "
        f"variables {empty[:6]}: variance-scaling initializers divide by a zero fan-in / "
        "fan-out. Give those layers a kernel_init that returns zeros for zero-size shapes "
        "(examples.models.sized), or use slim(), whose apply_fn runs any model.") from e


def _nnx_features(module) -> None:
  """Sets an NNX layer's feature attributes from its (slim) parameter shapes."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    groups = getattr(module, "feature_group_count", 1)
    if groups > 1:  # (depthwise) groups lose whole groups: same outputs per group
      groups = module.kernel.shape[-1] // (module.out_features // groups)
      module.feature_group_count = groups
    module.in_features = module.kernel.shape[-2] * groups
    module.out_features = module.kernel.shape[-1]
  elif isinstance(module, nnx.Linear):
    module.in_features, module.out_features = module.kernel.shape
  elif isinstance(module, nnx.LinearGeneral):
    n_in = len(module.in_features)
    module.in_features = tuple(module.kernel.shape[:n_in])
    module.out_features = tuple(module.kernel.shape[n_in:])
  elif isinstance(module, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
    stats = [getattr(module, a, None) for a in ("scale", "bias", "mean", "var")]
    module.num_features = next(s.shape[-1] for s in stats if s is not None)
  elif isinstance(module, nnx.MultiHeadAttention):
    q = module.query.kernel
    module.in_features, module.num_heads, module.head_dim = q.shape
    module.qkv_features = module.num_heads * module.head_dim
    module.out_features = module.out.kernel.shape[-1]
    if hasattr(module, "num_kv_heads"):
      module.num_kv_heads = module.key.kernel.shape[1]


def nnx_functional(model) -> tuple[Callable, dict, Callable]:
  """An NNX module as ``(apply_fn, variables, rebuild)``: ``apply_fn(v, x)`` calls the
  module merged from ``v = {"params": State, "rest": State}`` (every Variable), and
  ``rebuild(v)`` makes a new module of them with its layer attributes set from the
  new shapes (the form slimming, widening and ``channel_groups`` trace)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(v, x):
    return nnx.merge(graphdef, v["params"], v["rest"])(x)

  def rebuild(v):
    new = nnx.merge(graphdef, v["params"], v["rest"])
    for _, module in nnx.iter_modules(new):
      _nnx_features(module)
    return new

  return apply_fn, {"params": params, "rest": rest}, rebuild


def slim_nnx(model, masks: Any, sample_input: Any, *, inexact: str = "fold",
             count_flops: bool = True, verify: bool = True, round_to: int = 1) -> SlimModel:
  """:func:`slim` for a Flax NNX module: a new module with the slim arrays.

  Every ``nnx.Variable`` (params, BatchNorm statistics, ...) is cut to the
  kept channels and the feature attributes of the standard layers (``Linear``,
  ``LinearGeneral``, ``Conv``, ``BatchNorm``, ``LayerNorm``,
  ``MultiHeadAttention``, ...) are set from the new shapes. ``model`` itself is
  not changed. Call it with the model in eval mode (``model.eval()``) so
  BatchNorm uses its running statistics.

  Args:
    model: the NNX module, called as ``model(x)``.
    masks: masks with the structure of ``nnx.state(model, nnx.Param)`` (e.g.
      ``support(optimizer.opt_state)``), see :func:`slim`.
    sample_input: an input batch.
    inexact, count_flops, round_to: see :func:`slim`.
    verify: as in :func:`slim`, and check the new module's outputs.

  Returns:
    A :class:`SlimModel` whose ``module`` is the new NNX module and whose
    ``variables`` are ``{"params": State, "rest": State}``.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  apply_fn, variables, rebuild = nnx_functional(model)
  res = slim(apply_fn, variables, masks, sample_input,
             inexact=inexact, count_flops=count_flops, verify=verify, round_to=round_to)
  new = rebuild(res.variables)
  if not verify:
    return dataclasses.replace(res, module=new)
  probe = sub_batch(sample_input, res.report["batch_resizable"])
  check_same_outputs(res.apply_fn(res.variables, probe), nnx.jit(lambda m, x: m(x))(new, probe),
                      f"slim_nnx: the rebuilt {type(model).__name__}")
  return dataclasses.replace(res, module=new)
