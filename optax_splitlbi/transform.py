"""The SplitLBI gradient transformation (paper eqs. 4, 12-14; official DessiLBI code).

With loss L̄(W, Γ) = L(W) + ‖W − Γ‖²/(2ν), learning rate α, damping κ,
momentum τ and weight decay β, each step of a penalized leaf is::

    g̃  = ∇L(W) + β·W                               (β where weight_decay_mask)
    b' = τ·b + g̃                                     (momentum on the loss gradient)
    W' = W − κα·b' − (κα/ν)·(W − Γ)                  (coupling outside the momentum)
    V' = V − (α/ν)·(Γ − W)                           (old W, old Γ)
    Γ' = κ·Prox_{λΩ}(V')

from V₀ = Γ₀ = b₀ = 0. Options: ``nesterov`` steps along g̃ + τ·b' instead of
b'; ``coupling="momentum"`` is paper eq. 12, b' = τ·b + g̃ + (W − Γ)/ν and
W' = W − κα·b'. Leaves without a penalty get momentum SGD at step κα.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax
from jax.tree_util import register_static

from optax_splitlbi import penalties as penalties_lib
from optax_splitlbi import prox as prox_lib

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
_MASKED = optax.MaskedNode()


@register_static
class StaticHyperparams(NamedTuple):
  """κ and λ as given to ``init`` (for recomputing Γ = κ·Prox(V) from V).

  ``None`` where they were traced values at init time.
  """

  kappa: Optional[float]
  lam: Optional[float]


class SplitLBIState(NamedTuple):
  """State of :func:`splitlbi`; every array field has the params' structure.

  Attributes:
    count: number of updates done (int32), indexes a learning-rate schedule.
    momentum: the momentum buffer b of every leaf.
    v: the dual variable V (``MaskedNode`` on unpenalized leaves).
    gamma: the sparse copy Γ = κ·Prox(V) (``MaskedNode`` on unpenalized
      leaves); ``None`` when ``store_gamma=False`` (recompute it with
      :func:`optax_splitlbi.gamma`).
    entry: with ``record_path=True``, per group (keepdims layout) or per entry
      (lasso) the step k at which Γ_k first became nonzero there, −1 if not yet;
      otherwise ``None``.
    penalty: the resolved :class:`~optax_splitlbi.penalties.LeafPenalty` of
      every leaf (``None`` if unpenalized). Static: holds no arrays.
    hyper: κ and λ at init (static), for recomputing Γ from V.
  """

  count: jax.Array
  momentum: optax.Updates
  v: optax.Updates
  gamma: Optional[optax.Updates]
  entry: Optional[optax.Updates]
  penalty: Any
  hyper: StaticHyperparams


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check(name: str, value: Any, ok: Callable[[float], bool], need: str) -> None:
  if callable(value) or not _is_concrete(value):
    return
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"splitlbi: {name} must be a number, got {value!r}.") from None
  if not math.isfinite(x) or not ok(x):
    raise ValueError(f"splitlbi: {name} must be {need}, got {value!r}.")


def _static_float(x: Any) -> Optional[float]:
  if callable(x) or not _is_concrete(x):
    return None
  return float(x)


def _own_buffer(fn: Callable[..., jax.Array], pred: jax.Array, *args) -> jax.Array:
  """``fn(*args)``; on CPU computed once, into its own buffer.

  XLA:CPU has no sibling multi-output fusion: each consumer of a cheap
  elementwise value (here the coupling term (W − Γ)/ν, read by the updates of
  b, W and V) recomputes it from W and Γ, and with donated params and state
  the in-place writes of W' and Γ' then force full copies of the old W and Γ.
  A conditional whose two branches are both ``fn`` (``pred`` is any traced
  bool) cannot be fused through, so the value is materialized once and the
  copies disappear (update of the ResNet-50 tree 1.6-1.9× faster on CPU;
  benchmarks/RESULTS.md).
  Other backends fuse well and get plain ``fn(*args)``.
  """
  return jax.lax.platform_dependent(
      pred, *args,
      cpu=lambda p, *a: jax.lax.cond(p, fn, fn, *a),
      default=lambda p, *a: fn(*a))


def _cpu_multi_output_fusion() -> bool:
  """Whether XLA:CPU's multi-output fusion pass is on (read when tracing).

  It is off by default and enabled by
  ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
  set before JAX starts; it cannot be set per ``jit``.
  """
  return "xla_cpu_use_multi_output_fusion" in os.environ.get("XLA_FLAGS", "")


def _momentum_coefficients(tau, nesterov: bool):
  """(G, B) with direction = G·g̃ + B·b: b' = τ·b + g̃, Nesterov g̃ + τ·b'."""
  return (1 + tau, tau * tau) if nesterov else (1, tau)


def _fused_momentum_step(g, w, b, *, step, tau, wd, nesterov):
  """ΔW = −sG·g − sB·b − sGβ'·W and b' = τ·b + g + β'·W of an unpenalized
  leaf: no common intermediate, one kernel under multi-output fusion (see
  :func:`_fused_penalized_step`)."""
  big_g, big_b = _momentum_coefficients(tau, nesterov)
  update = -(step * big_g) * g - (step * big_b) * b
  if wd is None:
    return update, tau * b + g
  return update - (step * big_g * wd) * w, tau * b + g + wd * w


def _fused_penalized_step(g, w, b, v, gam, *, alpha, step, nu, tau, wd, nesterov, coupling,
                          kappa, lam, penalty, axis_name):
  r"""The update, b', V', Γ' of a penalized leaf, written for multi-output fusion.

  The same numbers as the line-by-line form of :func:`splitlbi` (to float
  rounding), with the shared terms (b', W − Γ, Γ) distributed so that the
  update, b' and V' are expressions of W, g, b, V, Γ with no common
  intermediate. XLA:CPU's multi-output fusion pass (which never duplicates
  an intermediate) then makes them one kernel that reads each input once.
  With s = κα, G = 1 + τ, B = τ² (Nesterov) or G = 1, B = τ, and β' = β
  where decayed::

      b'  = τ·b + g + β'·W                         (+ (W − Γ)/ν, coupling="momentum")
      ΔW  = −sG·g − sB·b − (sGβ' + s/ν)·W + (s/ν)·Γ   (outside)
      ΔW  = −sG·g − sB·b − sG(β' + 1/ν)·W + (sG/ν)·Γ  (momentum)
      V'  = V + (α/ν)·(W − Γ)

  ``wd`` is β' or ``None`` (no decay term). ``gam=None`` (lean mode): each
  use of Γ = κ·Prox(V) is its own expression (group: the per-group scale
  times V; lasso: three exact forms of the soft-threshold). For lasso,
  Γ' = κ·Prox(V') is elementwise and joins the kernel (from V' written as
  V − (α/ν)·(Γ − W)); a group prox needs the norms of V' first.
  """
  lasso = penalty.kind == "lasso"
  t = penalty.threshold(lam)
  if gam is not None:
    def gamma_times(c, form):  # c·Γ
      del form
      return c * gam
  elif lasso:
    soft = (lambda x: prox_lib.soft_threshold(x, t),
            lambda x: x - jnp.clip(x, -t, t),
            lambda x: jnp.maximum(x - t, 0) + jnp.minimum(x + t, 0))

    def gamma_times(c, form):
      return (c * kappa) * soft[form](v)
  else:
    scales = prox_lib.group_scales(v, penalty.reduce_axes, t, axis_name)

    def gamma_times(c, form):
      del form
      return (c * kappa * scales) * v

  big_g, big_b = _momentum_coefficients(tau, nesterov)
  beta = 0 if wd is None else wd
  if coupling == "outside":
    c_w, c_gam = step * big_g * beta + step / nu, step / nu
    b_next = tau * b + g if wd is None else tau * b + g + wd * w
  else:
    c_w, c_gam = step * big_g * (beta + 1 / nu), step * big_g / nu
    b_next = tau * b + g + (beta + 1 / nu) * w - gamma_times(1 / nu, 2)
  update = gamma_times(c_gam, 0) - (step * big_g) * g - (step * big_b) * b - c_w * w
  v_next = v + (alpha / nu) * (w - (gam if gam is not None else gamma_times(1, 1)))
  gam_next = None
  if gam is not None:
    v_prox = v - (alpha / nu) * (gam - w) if lasso else v_next
    gam_next = kappa * prox_lib.prox(v_prox, penalty, lam, axis_name)
  return update, b_next, v_next, gam_next


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, jax.sharding.PartitionSpec)


def _group_split_axes(param_specs, params, treedef, pens, p_leaves) -> list[tuple]:
  """Per leaf, the shard_map mesh axes that split its groups (else ())."""
  if param_specs is None:
    return [()] * len(pens)
  specs = treedef.flatten_up_to(jax.tree.broadcast(param_specs, params, is_leaf=_is_spec))
  paths = [penalties_lib.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out = []
  for path, spec, pe, w in zip(paths, specs, pens, p_leaves):
    names = []
    if pe is not None and pe.kind == "group" and spec is not None:
      for a in pe.reduce_axes:
        entry = spec[a] if a < len(spec) else None
        names += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
    if names:
      try:
        split = math.prod(jax.lax.axis_size(n) for n in names)
      except NameError:
        raise ValueError(f"splitlbi: param_specs splits the groups of {path} over mesh "
                         f"axes {names}, but update is not inside jax.shard_map over "
                         "them; under jax.jit leave param_specs=None.") from None
      local = math.prod(w.shape[a] for a in pe.reduce_axes)
      if local * split != pe.group_size:
        raise ValueError(f"splitlbi: {path}: a local group has {local} entries, split "
                         f"{split} ways, but the state's group size is {pe.group_size}; "
                         "call init on the global params and pass their specs.")
    out.append(tuple(names))
  return out


def _default_weight_decay_mask(params):
  return jax.tree.map(lambda p: len(p.shape) > 1, params)


def splitlbi(
    learning_rate: ScalarOrSchedule,
    kappa: float = 1.0,
    nu: float = 100.0,
    lam: float = 1.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    penalty: Any = None,
    coupling: str = "outside",
    *,
    record_path: bool = False,
    store_gamma: bool = True,
    state_dtype: Optional[jnp.dtype] = None,
    param_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Split Linearized Bregman Iteration (Fu et al., "Exploring Structural
  Sparsity of Deep Networks via Inverse Scale Spaces", TPAMI 2022; eqs. 4, 12-14).

  Trains the dense weights W with SGD-momentum cost while a sparse copy
  Γ = κ·Prox_{λΩ}(V) walks an inverse-scale-space path from 0, the important
  filters / weights entering supp(Γ) first. Per penalized leaf::

      b' = τ·b + ∇L(W) + β·W
      W' = W − κα·b' − (κα/ν)·(W − Γ)
      V' = V − (α/ν)·(Γ − W)
      Γ' = κ·Prox_{λΩ}(V')

  Args:
    learning_rate: α, a float or an optax schedule of the step count. The
      weights move at κα (keep κα = 0.1 to compare with SGD at 0.1).
    kappa: damping κ > 0 (paper default 1).
    nu: coupling ν > 0 between W and Γ (paper: 10 on MNIST/CIFAR, 1000 on
      ImageNet; the official code's default, 100, is used here). ν → ∞
      decouples W, which then follows plain SGD.
    lam: sparsity weight λ ≥ 0, the prox threshold (per-leaf specs may
      override it). The official code hard-codes 1.
    momentum: τ in [0, 1); 0 gives the "Naive" variant.
    nesterov: step along ∇L + β·W + τ·b' (as PyTorch SGD and the lottery code).
    weight_decay: β ≥ 0, added to the gradient before the momentum.
    weight_decay_mask: pytree of bools, or a prefix of one (or a callable ``params -> bools``)
      choosing the leaves decayed; default leaves with ndim > 1.
    penalty: per-leaf penalty spec: ``None`` (4-D → filter groups, 2-D →
      lasso, else none), one spec for all leaves, a pytree (prefix) of specs,
      or a callable ``(path, leaf) -> spec``; see
      :mod:`optax_splitlbi.penalties`.
    coupling: ``"outside"`` (official code: the coupling (W − Γ)/ν is added
      outside the momentum) or ``"momentum"`` (paper eq. 12: through it).
    record_path: keep, per group / entry, the step at which it first entered
      supp(Γ) (an int32 per group) in ``state.entry``.
    store_gamma: keep Γ in the state (3× param bytes). ``False`` recomputes
      Γ = κ·Prox(V) each step (2× param bytes, one extra prox per step).
    state_dtype: dtype of b, V and Γ (e.g. ``jnp.float32`` with bf16
      params); default: each parameter's dtype.
    param_specs: only for ``update`` inside ``jax.shard_map`` when a group is
      split over devices: the params' ``PartitionSpec`` s (a pytree prefix,
      as in ``in_specs``). Group norms are then psum-reduced over the mesh
      axes named at a group's reduced axes, so Γ is the prox of the global
      group. Not needed under ``jax.jit`` (GSPMD reduces globally), with
      ``pmap``, or when no reduced axis is sharded. Call ``init`` on the
      global params, outside ``shard_map``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ignores extra keyword arguments.

  On CPU, set ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
  before JAX starts: the update is then traced in a form (same numbers) whose
  ΔW, b', V' per leaf XLA:CPU fuses into one kernel (benchmarks/RESULTS.md).
  """
  _check("kappa", kappa, lambda x: x > 0, "> 0")
  _check("nu", nu, lambda x: x > 0, "> 0")
  _check("lam", lam, lambda x: x >= 0, ">= 0")
  _check("momentum", momentum, lambda x: 0 <= x < 1, "in [0, 1)")
  _check("weight_decay", weight_decay, lambda x: x >= 0, ">= 0")
  _check("learning_rate", learning_rate, lambda x: x >= 0, ">= 0")
  if coupling not in ("outside", "momentum"):
    raise ValueError(f"splitlbi: coupling must be 'outside' or 'momentum', got {coupling!r}.")

  def dtype_of(p):
    return jnp.dtype(state_dtype) if state_dtype is not None else p.dtype

  def init_fn(params: optax.Params) -> SplitLBIState:
    pen = penalties_lib.resolve_penalties(penalty, params)
    leaves, treedef = jax.tree.flatten(params)
    pens = treedef.flatten_up_to(pen)

    # zeros_like keeps each parameter's sharding: the state follows the params.
    def zeros(p, pe, keep_unpenalized=False):
      if pe is None and not keep_unpenalized:
        return _MASKED
      return jnp.zeros_like(p, dtype_of(p))

    def entry0(p, pe):
      if pe is None:
        return _MASKED
      # keepdims layout, sharded as p on the group-index axes (the sum is dead code in jit)
      like = jnp.sum(jnp.zeros_like(p, jnp.int32), axis=pe.reduce_axes, keepdims=True)
      return jnp.full_like(like, -1)

    # Each zeros() call makes its own buffer, so donating the state is safe.
    unflat = treedef.unflatten
    return SplitLBIState(
        count=jnp.zeros([], jnp.int32),
        momentum=unflat([zeros(p, pe, True) for p, pe in zip(leaves, pens)]),
        v=unflat([zeros(p, pe) for p, pe in zip(leaves, pens)]),
        gamma=unflat([zeros(p, pe) for p, pe in zip(leaves, pens)]) if store_gamma else None,
        entry=unflat([entry0(p, pe) for p, pe in zip(leaves, pens)]) if record_path else None,
        penalty=pen,
        hyper=StaticHyperparams(_static_float(kappa), _static_float(lam)),
    )

  def update_fn(updates, state: SplitLBIState, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("splitlbi needs the current parameters: call "
                       "update(grads, state, params) (params=None was given).")
    count = state.count
    alpha = learning_rate(count) if callable(learning_rate) else learning_rate
    step = kappa * alpha  # the weights move at κα

    g_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = treedef.flatten_up_to(params)
    flat = treedef.flatten_up_to
    b_leaves = flat(state.momentum)
    v_leaves = flat(state.v)
    pens = flat(state.penalty)
    gam_leaves = flat(state.gamma) if store_gamma else [None] * len(g_leaves)
    ent_leaves = flat(state.entry) if record_path else [None] * len(g_leaves)
    mask = weight_decay_mask if weight_decay_mask is not None else _default_weight_decay_mask
    if callable(mask):
      mask = mask(params)
    try:  # a pytree of bools, or a prefix of one (e.g. {"Dense_0": False, "Conv_0": True})
      decay = flat(jax.tree.broadcast(mask, params))
    except (ValueError, TypeError) as e:
      raise ValueError("splitlbi: weight_decay_mask must be a pytree of bools (or a prefix) "
                       f"matching the params, or a callable returning one: {e}") from None
    axes = _group_split_axes(param_specs, params, treedef, pens, p_leaves)
    # β = 0 given as a number: skip the β·W term (one read of W less).
    no_decay = _is_concrete(weight_decay) and not callable(weight_decay) and weight_decay == 0

    # On XLA:CPU with multi-output fusion on: the fusion-friendly form.
    fused_form = _cpu_multi_output_fusion()

    def momentum_step(b, g_tilde):
      """b' = τ·b + g̃ and the step direction (Nesterov: g̃ + τ·b')."""
      b_next = momentum * b + g_tilde
      return b_next, (g_tilde + momentum * b_next if nesterov else b_next)

    new_u, new_b, new_v, new_gam, new_ent = [], [], [], [], []
    for g, w, b, v, gam, ent, pe, dec, ax in zip(g_leaves, p_leaves, b_leaves, v_leaves,
                                                 gam_leaves, ent_leaves, pens, decay, axes):
      ctype = jnp.promote_types(b.dtype, w.dtype)
      gc, wc, bc = g.astype(ctype), w.astype(ctype), b.astype(ctype)
      wd = weight_decay if dec and not no_decay else None  # β on this leaf, None: no term
      if pe is None:  # momentum SGD at κα

        def sgd_line_by_line(gc, wc, bc, wd=wd):
          b_next, direction = momentum_step(bc, gc if wd is None else gc + wd * wc)
          return -step * direction, b_next

        if fused_form:
          fused = functools.partial(
              _fused_momentum_step, step=step, tau=momentum, nesterov=nesterov, wd=wd)
          update, b_next = jax.lax.platform_dependent(
              gc, wc, bc, cpu=fused, default=sgd_line_by_line)
        else:
          update, b_next = sgd_line_by_line(gc, wc, bc)
        new_u.append(update.astype(g.dtype))
        new_b.append(b_next.astype(b.dtype))
        new_v.append(_MASKED)
        new_gam.append(_MASKED)
        new_ent.append(_MASKED)
        continue
      vc = v.astype(ctype)

      def line_by_line(gc, wc, bc, vc, gam, pe=pe, ctype=ctype, ax=ax, wd=wd):
        gt = gc if wd is None else gc + wd * wc

        # Lean, groups: Γ = κ·scale_g·V, the per-group scales reduced outside
        # the conditional (inside it the scaling ran on one thread).
        lean_group = not store_gamma and pe.kind != "lasso"
        gam_or_scales = (kappa * prox_lib.group_scales(vc, pe.reduce_axes, pe.threshold(lam), ax)
                         if lean_group else gam)

        def coupling_fn(wc, vc, gam_or_scales):
          if store_gamma:
            gc_old = gam_or_scales.astype(ctype)
          elif lean_group:
            gc_old = gam_or_scales * vc
          else:
            gc_old = kappa * prox_lib.soft_threshold(vc, pe.threshold(lam))
          return (wc - gc_old) / nu  # ∇_W ‖W − Γ‖²/(2ν)

        coupling_term = _own_buffer(coupling_fn, count >= 0, wc, vc, gam_or_scales)
        if coupling == "momentum":
          gt = gt + coupling_term
        b_next, direction = momentum_step(bc, gt)
        if coupling == "outside":
          direction = direction + coupling_term
        v_next = vc + alpha * coupling_term  # V' = V − (α/ν)(Γ − W)
        gam_next = kappa * prox_lib.prox(v_next, pe, lam, ax) if store_gamma else None
        return -step * direction, b_next, v_next, gam_next

      if fused_form:
        fused = functools.partial(
            _fused_penalized_step, alpha=alpha, step=step, nu=nu, tau=momentum, wd=wd,
            nesterov=nesterov, coupling=coupling, kappa=kappa, lam=lam, penalty=pe,
            axis_name=ax)
        update, b_next, v_next, gam_next = jax.lax.platform_dependent(
            gc, wc, bc, vc, None if gam is None else gam.astype(ctype),
            cpu=fused, default=line_by_line)
      else:
        update, b_next, v_next, gam_next = line_by_line(gc, wc, bc, vc, gam)
      new_u.append(update.astype(g.dtype))
      new_b.append(b_next.astype(b.dtype))
      new_v.append(v_next.astype(v.dtype))
      if store_gamma:
        new_gam.append(gam_next.astype(gam.dtype))
      if record_path:
        entered = prox_lib.active(v_next, pe, lam, ax) & (ent < 0)
        new_ent.append(jnp.where(entered, count + 1, ent).astype(jnp.int32))

    unflat = treedef.unflatten
    new_state = SplitLBIState(
        count=optax.safe_increment(count),
        momentum=unflat(new_b),
        v=unflat(new_v),
        gamma=unflat(new_gam) if store_gamma else None,
        entry=unflat(new_ent) if record_path else None,
        penalty=state.penalty,
        hyper=state.hyper,
    )
    return unflat(new_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
