"""The SplitLBI gradient transformation (paper eqs. 4, 12-14; official DessiLBI code).

SplitLBI minimizes L̄(W, Γ) = L(W) + ‖W − Γ‖²/(2ν) by gradient descent in W and
mirror descent in Γ. With learning rate α, damping κ, momentum τ and weight
decay β, from V₀ = Γ₀ = b₀ = 0, one step of a penalized leaf is
(:func:`penalized_leaf_step`)::

    g̃  = ∇L(W) + β·W                        weight decay
    b' = τ·b + g̃                             momentum on the loss gradient
    W' = W − κα·b' − (κα/ν)·(W − Γ)           coupling outside the momentum
    V' = V − (α/ν)·(Γ − W)                    old W, old Γ
    Γ' = κ·Prox_{λΩ}(V')

``nesterov`` steps along g̃ + τ·b' instead of b'; ``coupling="momentum"`` is
paper eq. 12, where the coupling gradient (W − Γ)/ν joins g̃ before the
momentum. Leaves without a penalty get momentum SGD at step κα
(:func:`sgd_leaf_step`).

With ``direction`` (any optax transformation, e.g. ``optax.scale_by_adam()``;
AdaBreg, Bungert et al., JMLR 2022, for Adam-preconditioned Bregman iterations)
the loss gradient's direction d replaces the momentum, and weight decay is
decoupled as in AdamW::

    d  = direction(∇L(W))                     e.g. m̂/(√v̂ + ε)
    W' = W − κα·(d + β·W) − (κα/ν)·(W − Γ)     coupling outside the preconditioner
    V' = V − (α/ν)·(Γ − W),   Γ' = κ·Prox_{λΩ}(V')

or, with ``coupling="momentum"``, the whole gradient of L̄ through it::

    d  = direction(∇L(W) + (W − Γ)/ν)         ∇_W L̄, preconditioned
    W' = W − κα·(d + β·W)

There W settles where ∇L(W) + (W − Γ)/ν = 0, i.e. W − Γ = −ν·∇L(W), in the
gradient's units as with the paper's update; outside the preconditioner d is of
order one whatever the gradient's scale, and a group outside supp(Γ) settles
near |W| ~ ν·|d| instead.

Settled so, V' = V − α·∇L(W): V, and Γ on its support, descend the loss by plain
gradient steps of size α, while W moves at the preconditioned speed only within
ν·∇L of Γ. ``dual_direction`` (e.g. a second ``optax.scale_by_adam()``, AdaBreg's
Adam on the dual variable) preconditions the dual step as well::

    V' = V + α·dual_direction((W − Γ)/ν),   Γ' = κ·Prox_{λΩ}(V')

so that settled, V' = V − α·Adam(∇L(W)).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_splitlbi import _checks
from optax_splitlbi import _shard_map
from optax_splitlbi import _xla_cpu
from optax_splitlbi import penalties as penalties_lib
from optax_splitlbi import prox as prox_lib
from jax.tree_util import register_static

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
_MASKED = optax.MaskedNode()


@register_static
@dataclasses.dataclass(frozen=True)
class ParamShape:
  """A parameter's shape and dtype, held statically (a pytree node without leaves) where
  the state keeps no array: ``SplitLBIState.momentum`` with a direction."""

  shape: tuple[int, ...]
  dtype: Any


class SplitLBIState(NamedTuple):
  """State of :func:`splitlbi`. The array fields have the params' structure.

  Its tree structure depends only on the params, the penalty layout and the
  ``store_gamma`` / ``record_path`` options, never on hyperparameter values.

  Attributes:
    count: number of updates done (int32); indexes a learning-rate schedule.
    momentum: the momentum buffer b of every leaf; with ``splitlbi(direction=...)``,
      which has no use for b, a :class:`ParamShape` per leaf (no array, no memory).
    v: the dual variable V (``MaskedNode`` on unpenalized leaves).
    gamma: the sparse copy Γ = κ·Prox(V) (``MaskedNode`` on unpenalized
      leaves); ``None`` with ``store_gamma=False`` (:func:`optax_splitlbi.gamma`
      recomputes it).
    entry: with ``record_path=True``, per group (keepdims layout) or entry
      (lasso) the step at which Γ first became nonzero there, −1 if not yet;
      otherwise ``None``.
    kappa: κ of the last update (float32), so that Γ = κ·Prox_t(V).
    threshold: the prox threshold t (λ, or λ·√d) of every penalized leaf, in
      leaf order (float32 vector), as used by the last update.
    penalty: the :class:`~optax_splitlbi.penalties.LeafPenalty` group layout of
      every leaf (``None`` if unpenalized). Static: holds no arrays.
    direction: with ``splitlbi(direction=...)``, that transformation's state;
      else ``None``.
    dual_direction: with ``splitlbi(dual_direction=...)``, that transformation's
      state over the penalized leaves (``MaskedNode`` elsewhere); else ``None``.
  """

  count: jax.Array
  momentum: optax.Updates
  v: optax.Updates
  gamma: Optional[optax.Updates]
  entry: Optional[optax.Updates]
  kappa: jax.Array
  threshold: jax.Array
  penalty: Any
  direction: Any = None
  dual_direction: Any = None


class Hyperparams(NamedTuple):
  """The scalars of one step: floats, or arrays (schedules, inject_hyperparams)."""

  alpha: Any  # α, the learning rate at this step
  kappa: Any  # κ
  nu: Any  # ν
  momentum: Any  # τ
  weight_decay: Any  # β of this leaf; None: no decay term
  count: jax.Array  # k, the number of updates done before this one


def momentum_step(b: jax.Array, g: jax.Array, tau, nesterov: bool):
  """b' = τ·b + g and the step direction: b', or g + τ·b' (Nesterov)."""
  b_next = tau * b + g
  return b_next, (g + tau * b_next if nesterov else b_next)


def decayed(g: jax.Array, w: jax.Array, h: Hyperparams) -> jax.Array:
  """g̃ = ∇L(W) + β·W (no term where the leaf is not decayed)."""
  return g if h.weight_decay is None else g + h.weight_decay * w


def sgd_leaf_step(g: jax.Array, w: jax.Array, b: jax.Array, h: Hyperparams, *,
                  nesterov: bool):
  """Momentum SGD at step κα for an unpenalized leaf.

  Args:
    g: ∇L(W).
    w: W.
    b: the momentum buffer.
    h: the step's hyperparameters.
    nesterov: Nesterov momentum.

  Returns:
    ``(W' − W, b')``.
  """
  b_next, direction = momentum_step(b, decayed(g, w, h), h.momentum, nesterov)
  return -h.kappa * h.alpha * direction, b_next


def _call(fn: Callable[..., jax.Array], *args) -> jax.Array:
  return fn(*args)


def coupling_gradient(w: jax.Array, gam: jax.Array, h: Hyperparams) -> jax.Array:
  """∇_W ‖W − Γ‖²/(2ν) = (W − Γ)/ν."""
  return (w - gam) / h.nu


def dual_step(v: jax.Array, coupling_grad: jax.Array, h: Hyperparams) -> jax.Array:
  """V' = V − (α/ν)·(Γ − W) = V + α·(W − Γ)/ν (paper eq. 4b; old W, old Γ)."""
  return v + h.alpha * coupling_grad


def penalized_leaf_step(g, w, b, v, gam, dual, prox_v: prox_lib.LeafProx,
                        gamma_of: Optional[prox_lib.LeafProx], h: Hyperparams, *,
                        nesterov: bool, coupling: str,
                        own_buffer: Callable[..., jax.Array] = _call):
  r"""One SplitLBI step of a penalized leaf (paper eqs. 4, 12-14).

  Args:
    g: ∇L(W).
    w: W.
    b: the momentum buffer b.
    v: the dual variable V.
    gam: the stored Γ, or ``None`` in lean mode (``store_gamma=False``).
    dual: the preconditioned dual step D((W − Γ)/ν) (``dual_direction``), or
      ``None``: V' = V + α·(W − Γ)/ν.
    prox_v: Prox_{λΩ} of this leaf, a function of V (soft-threshold or group
      shrinkage at the leaf's threshold t; for a member of a cross-leaf class,
      the shrinkage by the group norms over all members of V').
    gamma_of: lean mode: V ↦ Γ = κ·Prox_t(V) with the κ and t of the last step.
    h: the step's hyperparameters α, κ, ν, τ and this leaf's β.
    nesterov: step along g̃ + τ·b'.
    coupling: ``"outside"`` (official code), ``"momentum"`` (paper eq. 12) or
      ``"direction"`` (``g`` is already the direction of ∇_W L̄: no coupling in W').
    own_buffer: ``own_buffer(fn, *args)`` computes the coupling gradient;
      ``fn(*args)`` except in the XLA:CPU form (:mod:`optax_splitlbi._xla_cpu`).

  Returns:
    ``(W' − W, b', V', Γ')``.
  """

  def coupling_of(w, v, gam):  # ∇_W ‖W − Γ‖²/(2ν), lean mode: Γ = κ·Prox_t(V)
    return coupling_gradient(w, gamma_of(v) if gam is None else gam, h)

  g = decayed(g, w, h)  # g̃ = ∇L(W) + β·W
  coupling_grad = own_buffer(coupling_of, w, v, gam)  # (W − Γ)/ν
  if coupling == "momentum":
    g = g + coupling_grad  # eq. 12: through the momentum
  b_next, direction = momentum_step(b, g, h.momentum, nesterov)  # b' = τ·b + g̃
  if coupling == "outside":
    direction = direction + coupling_grad  # official code: outside it
  # coupling == "direction": g is already direction(∇L + (W − Γ)/ν) (+ β·W)
  w_step = -h.kappa * h.alpha * direction  # W' = W − κα·b' − (κα/ν)·(W − Γ)
  # V' = V − (α/ν)·(Γ − W), or V + α·D((W − Γ)/ν) with a dual direction
  v_next = dual_step(v, coupling_grad if dual is None else dual, h)
  gam_next = h.kappa * prox_v(v_next)  # Γ' = κ·Prox_{λΩ}(V')
  return w_step, b_next, v_next, gam_next


class _Leaf(NamedTuple):
  """One leaf's inputs to the update (``None`` where a leaf or mode has no such array)."""

  grad: jax.Array
  param: jax.Array
  momentum: jax.Array
  v: Any
  gamma: Any
  entry: Any
  penalty: Optional[penalties_lib.LeafPenalty]
  threshold: Any
  axis_name: tuple
  gamma_of: Optional[prox_lib.LeafProx]  # lean mode: V ↦ Γ of the last step
  weight_decay: Any  # β, or None where the leaf is not decayed
  dual: Any = None  # D((W − Γ)/ν) with a dual_direction, else None


def _leaf_update(leaf: _Leaf, h: Hyperparams, steps) -> _Leaf:
  """The update and new state of one leaf, computed in its state's precision.

  ``steps`` = (penalized step, SGD step) of the chosen form. Returns a
  :class:`_Leaf` whose ``grad`` field holds the update W' − W.
  """
  penalized_step, sgd_step = steps
  h = h._replace(weight_decay=leaf.weight_decay)
  ctype = jnp.promote_types(leaf.momentum.dtype, leaf.param.dtype)
  g, w, b = (x.astype(ctype) for x in (leaf.grad, leaf.param, leaf.momentum))
  if leaf.penalty is None:
    update, b_next = sgd_step(g, w, b, h)
    return leaf._replace(grad=update.astype(leaf.grad.dtype),
                         momentum=b_next.astype(leaf.momentum.dtype))
  pe, t, axes = leaf.penalty, leaf.threshold, leaf.axis_name
  prox_v = (prox_lib.PendingProx() if pe.shared is not None  # shrunk in shrink_members
            else prox_lib.LeafProx(pe, t, axes))
  v = leaf.v.astype(ctype)
  gam = None if leaf.gamma is None else leaf.gamma.astype(ctype)
  dual = None if leaf.dual is None else leaf.dual.astype(ctype)
  update, b_next, v_next, gam_next = penalized_step(g, w, b, v, gam, dual, prox_v,
                                                    leaf.gamma_of, h)
  entry = leaf.entry
  if entry is not None and pe.shared is None:  # the first step the group entered supp Γ
    entered = prox_v.active(v_next) & (entry < 0)
    entry = jnp.where(entered, h.count + 1, entry).astype(jnp.int32)
  return leaf._replace(
      grad=update.astype(leaf.grad.dtype), momentum=b_next.astype(leaf.momentum.dtype),
      v=v_next.astype(leaf.v.dtype), gamma=gam_next.astype(leaf.v.dtype), entry=entry)


def _leaf_steps(form: str, nesterov: bool, coupling: str):
  """(penalized step, SGD step) functions of the update form ``form``."""
  equations = (functools.partial(penalized_leaf_step, nesterov=nesterov, coupling=coupling),
               functools.partial(sgd_leaf_step, nesterov=nesterov))
  if form == "equations":
    return equations
  if form == "buffered":
    cpu = (functools.partial(_xla_cpu.buffered_leaf_step, equations[0]), equations[1])
  else:
    cpu = (functools.partial(_xla_cpu.fused_penalized_leaf_step, nesterov=nesterov,
                             coupling=coupling),
           functools.partial(_xla_cpu.fused_sgd_leaf_step, nesterov=nesterov))
  # The arrays are (g, W, b, V, Γ, dual) and (g, W, b).
  return tuple(_xla_cpu.on_cpu(c, e, n) for c, e, n in zip(cpu, equations, (6, 3)))


def _thresholds(resolved: list, layouts: list, lam) -> list:
  """t of every leaf (``None`` if unpenalized), with the state's group sizes."""
  out = []
  for r, pe in zip(resolved, layouts):
    if pe is None:
      out.append(None)
    else:  # the state's layout has the global group size (also under shard_map)
      out.append(penalties_lib.ResolvedPenalty(pe, r.lam, r.normalized).threshold(lam))
  return out


def _no_entry_yet(p: jax.Array, layout: penalties_lib.LeafPenalty) -> jax.Array:
  """−1 per group (keepdims layout), sharded as ``p`` on the group-index axes."""
  group_shape = jnp.sum(jnp.zeros_like(p, jnp.int32), layout.reduce_axes, keepdims=True)
  return jnp.full_like(group_shape, -1)  # the sum is dead code under jit


def _init_leaves(params, resolved: list, state_dtype, store_gamma: bool, record_path: bool,
                 keep_momentum: bool):
  """Zero b, V, Γ and the −1 entry record of every leaf (lists in leaf order; ``None``
  for a field the options leave out; b a :class:`ParamShape` without ``keep_momentum``).

  ``zeros_like`` keeps each parameter's sharding (the state follows the
  params), and every call makes its own buffer, so the state can be donated.
  """
  out = {"momentum": [], "v": [], "gamma": [], "entry": []}
  for p, r in zip(jax.tree.leaves(params), resolved):
    zeros = functools.partial(jnp.zeros_like, p, state_dtype or p.dtype)
    out["momentum"].append(zeros() if keep_momentum else
                           ParamShape(tuple(p.shape), jnp.dtype(state_dtype or p.dtype)))
    out["v"].append(_MASKED if r is None else zeros())
    if store_gamma:
      out["gamma"].append(_MASKED if r is None else zeros())
    if record_path:
      out["entry"].append(_MASKED if r is None else _no_entry_yet(p, r.layout))
  out["gamma"] = out["gamma"] if store_gamma else None
  out["entry"] = out["entry"] if record_path else None
  return out


def _scalar_copy(x) -> jax.Array:
  """``x`` as a float32 array in a buffer of its own (the state is donated)."""
  return jnp.array(x, jnp.float32, copy=True)


def _threshold_vector(thresholds: list) -> jax.Array:
  ts = [jnp.asarray(t, jnp.float32) for t in thresholds if t is not None]
  return jnp.stack(ts) if ts else jnp.zeros((0,), jnp.float32)


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
    xla_cpu_form: str = "auto",
    direction: Optional[optax.GradientTransformation] = None,
    dual_direction: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Split Linearized Bregman Iteration (Fu et al., "Exploring Structural
  Sparsity of Deep Networks via Inverse Scale Spaces", TPAMI 2022; eqs. 4, 12-14).

  Trains the dense weights W at SGD-momentum cost while a sparse copy
  Γ = κ·Prox_{λΩ}(V) walks an inverse-scale-space path from 0, the important
  filters / weights entering supp(Γ) first. Per penalized leaf::

      b' = τ·b + ∇L(W) + β·W
      W' = W − κα·b' − (κα/ν)·(W − Γ)
      V' = V − (α/ν)·(Γ − W)
      Γ' = κ·Prox_{λΩ}(V')

  Args:
    learning_rate: α, a number or an optax schedule of the step count. The
      weights move at κα (keep κα = 0.1 to compare with SGD at 0.1).
    kappa: damping κ > 0 (paper default 1).
    nu: coupling ν > 0 between W and Γ (paper: 10 on MNIST/CIFAR, 1000 on
      ImageNet; official default 100). ν → ∞ decouples W (plain SGD).
    lam: sparsity weight λ ≥ 0, the prox threshold (per-leaf specs may
      override it). The official code hard-codes 1.
    momentum: τ in [0, 1); 0 gives the "Naive" variant.
    nesterov: step along ∇L + β·W + τ·b' (as PyTorch SGD and the lottery code).
    weight_decay: β ≥ 0, added to the gradient before the momentum.
    weight_decay_mask: pytree of bools, or a prefix of one, or a callable
      ``params -> bools``, choosing the decayed leaves; default ndim > 1.
    penalty: per-leaf penalty spec: ``None`` (4-D → filter groups, 2-D →
      lasso, else none), one spec for all leaves, a pytree (prefix) of specs,
      or a callable ``(path, leaf) -> spec``; see :mod:`optax_splitlbi.penalties`.
    coupling: ``"outside"`` (official code: (W − Γ)/ν added outside the
      momentum) or ``"momentum"`` (paper eq. 12: through it; with a
      ``direction``, through the direction).
    record_path: keep in ``state.entry``, per group / entry, the step at which
      it first entered supp(Γ) (an int32 per group).
    store_gamma: keep Γ in the state (3× the penalized param bytes); ``False``
      recomputes Γ = κ·Prox(V) each step (2×, one extra prox per step).
    state_dtype: dtype of b, V and Γ (e.g. ``jnp.float32`` with bf16 params);
      default: each parameter's dtype.
    param_specs: only for ``update`` inside ``jax.shard_map`` when a group is
      split over devices: the params' ``PartitionSpec`` s (a prefix, as in
      ``in_specs``); group norms are then psum-reduced over the mesh axes at a
      group's reduced axes. Not needed under ``jax.jit`` or ``pmap``. Call
      ``init`` on the global params, outside ``shard_map``.
    xla_cpu_form: how the update is spelled when compiled for CPU (other
      backends always run the equations): ``"auto"`` (``"fused"`` if XLA's
      CPU multi-output fusion flag is set at construction, else
      ``"buffered"``), ``"buffered"``, ``"fused"`` or ``"equations"`` (exactly
      what GPU and TPU run). All give the same numbers to float rounding; see
      :mod:`optax_splitlbi._xla_cpu`.
    direction: an optax transformation giving the loss gradient's step
      direction d (e.g. ``optax.scale_by_adam()``, AdaBreg's preconditioner):
      W' = W − κα·(d + β·W) − (κα/ν)·(W − Γ), weight decay decoupled as in
      AdamW, on every leaf; ``momentum`` and ``nesterov`` do not apply (the
      direction keeps its own state). ``coupling="momentum"`` passes the
      coupling gradient through it too: W' = W − κα·(direction(∇L + (W − Γ)/ν)
      + β·W), so W − Γ settles at −ν·∇L as in the paper's update (module
      docstring). ``None`` (default): the paper's momentum update.
    dual_direction: an optax transformation preconditioning the dual step,
      V' = V + α·dual_direction((W − Γ)/ν) (e.g. ``optax.scale_by_adam()``: with
      ``coupling="momentum"`` and an Adam ``direction`` V, and Γ on its support,
      then descend the loss at Adam's speed rather than by plain gradient steps;
      AdaBreg's Adam on the dual variable). Its state covers the penalized
      leaves only. ``None`` (default): V' = V + (α/ν)·(W − Γ), the paper's.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ignores extra keyword arguments.
  """
  _checks.hyperparameters(learning_rate=learning_rate, kappa=kappa, nu=nu, lam=lam,
                          momentum=momentum, weight_decay=weight_decay, coupling=coupling)
  _checks.direction(direction, nesterov=nesterov)
  _checks.transformation("dual_direction", dual_direction)
  through_direction = direction is not None and coupling == "momentum"
  form = _xla_cpu.resolve_form(xla_cpu_form)
  steps = _leaf_steps(form, nesterov,
                      "direction" if through_direction else coupling)
  decay_mask = weight_decay_mask if weight_decay_mask is not None else _default_decay_mask

  def init_fn(params: optax.Params) -> SplitLBIState:
    resolved = _resolve(penalty, params)
    treedef = jax.tree.structure(params)
    arrays = _init_leaves(params, resolved, state_dtype, store_gamma, record_path,
                          keep_momentum=direction is None)
    layouts = [None if r is None else r.layout for r in resolved]
    return SplitLBIState(
        count=jnp.zeros([], jnp.int32),
        **{k: None if x is None else treedef.unflatten(x) for k, x in arrays.items()},
        kappa=_scalar_copy(kappa),
        threshold=_threshold_vector(_thresholds(resolved, layouts, lam)),
        penalty=treedef.unflatten(layouts),
        direction=None if direction is None else direction.init(params),
        dual_direction=None if dual_direction is None else dual_direction.init(
            _penalized(treedef, jax.tree.leaves(params), resolved)))

  def update_fn(updates, state: SplitLBIState, params=None, **extra_args):
    del extra_args
    _checks.update_inputs(updates, state, params)
    alpha = learning_rate(state.count) if callable(learning_rate) else learning_rate
    # With a direction, d = direction(∇L) replaces b' = τ·b + ∇L: τ = 0 and b = 0.
    h = Hyperparams(alpha=alpha, kappa=kappa, nu=nu, weight_decay=None, count=state.count,
                    momentum=momentum if direction is None else 0.0)
    stepped = state if direction is None else state._replace(momentum=jax.tree.map(
        lambda p: jnp.zeros((), state_dtype or p.dtype), params))
    leaves, thresholds = _flatten(updates, stepped, params, penalty=penalty, lam=lam,
                                  weight_decay=weight_decay, decay_mask=decay_mask,
                                  param_specs=param_specs)
    couplings = None  # (W − Γ)/ν, old W and Γ, where a direction or the dual step reads it
    if through_direction or dual_direction is not None:
      buffer = _xla_cpu.coupling_buffer(h.count) if form == "buffered" else _call
      couplings = _coupling_gradients(leaves, h, buffer)
    if direction is not None:
      leaves, direction_state = _directions(direction, leaves, state.direction, params,
                                            couplings if through_direction else None)
    if dual_direction is not None:
      leaves, dual_state = _dual_directions(dual_direction, leaves, state.dual_direction,
                                            params, couplings)
    elif through_direction:  # V' = V + α·(W − Γ)/ν with the (W − Γ)/ν the direction read
      leaves = [x if c is None else x._replace(dual=c) for x, c in zip(leaves, couplings)]
    new = shrink_members([_leaf_update(leaf, h, steps) for leaf in leaves], h)
    updates, new_state = _unflatten(new, state, params, kappa=kappa, thresholds=thresholds)
    if direction is not None:  # no b: its static shapes pass through
      new_state = new_state._replace(direction=direction_state, momentum=state.momentum)
    if dual_direction is not None:
      new_state = new_state._replace(dual_direction=dual_state)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _coupling_gradients(leaves: list, h: Hyperparams,
                        buffer: Callable[..., jax.Array]) -> list:
  """(W − Γ)/ν of every penalized leaf (Γ stored or κ·Prox_t(V)), in the precision of
  :func:`_leaf_update`; ``None`` elsewhere. ``buffer(fn, *arrays)`` computes each
  (``_call``, or on XLA:CPU :func:`~optax_splitlbi._xla_cpu.coupling_buffer`)."""
  out = []
  for x in leaves:
    if x.penalty is None:
      out.append(None)
      continue
    ctype = jnp.promote_types(x.momentum.dtype, x.param.dtype)
    w, v = x.param.astype(ctype), x.v.astype(ctype)
    if x.gamma is None:
      gamma_of = x.gamma_of if buffer is _call else _xla_cpu.norms_outside(x.gamma_of, v)
      out.append(buffer(lambda w, v, f=gamma_of: coupling_gradient(w, f(v), h), w, v))
    else:
      out.append(buffer(lambda w, g: coupling_gradient(w, g, h), w, x.gamma.astype(ctype)))
  return out


def _penalized(treedef, xs: list, flags: list) -> Any:
  """The leaves ``xs`` as a tree, ``MaskedNode`` where ``flags`` is ``None`` (the
  unpenalized leaves): the dual direction's structure."""
  return treedef.unflatten([_MASKED if f is None else x for x, f in zip(xs, flags)])


def _directions(direction: optax.GradientTransformation, leaves: list, direction_state,
                params, couplings: Optional[list]) -> tuple[list, Any]:
  """Every leaf's gradient replaced by d = direction(∇L), or with ``couplings``
  (coupling through the direction) d = direction(∇L + (W − Γ)/ν)."""
  grads = [x.grad for x in leaves]
  if couplings is not None:
    grads = [g if c is None else g + c for g, c in zip(grads, couplings)]
  treedef = jax.tree.structure(params)
  d, direction_state = direction.update(treedef.unflatten(grads), direction_state, params)
  return [x._replace(grad=g) for x, g in zip(leaves, treedef.flatten_up_to(d))], direction_state


def _dual_directions(dual_direction: optax.GradientTransformation, leaves: list, dual_state,
                     params, couplings: list) -> tuple[list, Any]:
  """Every penalized leaf's dual step D((W − Γ)/ν) into ``_Leaf.dual``."""
  treedef = jax.tree.structure(params)
  d, dual_state = dual_direction.update(
      _penalized(treedef, couplings, couplings), dual_state,
      _penalized(treedef, [x.param for x in leaves], couplings))
  return [x if c is None else x._replace(dual=dx)
          for x, c, dx in zip(leaves, couplings, treedef.flatten_up_to(d))], dual_state


def _flatten(updates, state: SplitLBIState, params, *, penalty, lam, weight_decay,
             decay_mask, param_specs) -> tuple[list, list]:
  """The inputs of every leaf (:class:`_Leaf`, leaf order) and the thresholds t."""
  treedef = jax.tree.structure(params)
  layouts = treedef.flatten_up_to(state.penalty)
  axes = _shard_map.group_split_axes(param_specs, params, layouts)  # first: local shapes
  resolved = _resolve(penalty, params)
  _checks.same_layout(resolved, layouts, params)
  thresholds = _thresholds(resolved, layouts, lam)
  none = [None] * len(layouts)
  gamma_of = none if state.gamma is not None else _gamma_functions(state, layouts, axes)
  arrays = [none if x is None else treedef.flatten_up_to(x)
            for x in (updates, params, state.momentum, state.v, state.gamma, state.entry)]
  per_leaf = zip(*arrays, layouts, thresholds, axes, gamma_of,
                 _decay_per_leaf(weight_decay, decay_mask, params))
  return [_Leaf(*x) for x in per_leaf], thresholds


def _unflatten(new: list, state: SplitLBIState, params, *, kappa, thresholds: list):
  """The updates and the new state from every leaf's :func:`_leaf_update`."""
  treedef = jax.tree.structure(params)

  def field(name: str, keep: bool = True):
    return treedef.unflatten([getattr(x, name) for x in new]) if keep else None

  new_state = SplitLBIState(
      count=optax.safe_increment(state.count), momentum=field("momentum"), v=field("v"),
      gamma=field("gamma", state.gamma is not None), entry=field("entry", state.entry is not None),
      kappa=_scalar_copy(kappa), threshold=_threshold_vector(thresholds), penalty=state.penalty)
  return field("grad"), new_state


def _keepdims(norms: jax.Array, ndim: int, axis: int) -> jax.Array:
  """A class's vector of group norms in a member's keepdims layout."""
  return jnp.reshape(norms, tuple(-1 if a == axis else 1 for a in range(ndim)))


def _class_norms(vs: list, layouts: list, axis_names: list) -> list:
  """Per leaf, ‖v_g‖₂ over all members of its cross-leaf class (keepdims), else ``None``.

  ``vs``: every leaf's V (or V'), ``None`` where the leaf is unpenalized.
  """
  out = [None] * len(layouts)
  for slices in penalties_lib.class_slices(layouts).values():
    norms = prox_lib.shared_norms([prox_lib.slice_sq_norms(vs[i], axis, axis_names[i])
                                   for i, axis, _ in slices])
    for i, axis, shrunk in slices:
      if shrunk:
        out[i] = _keepdims(norms, vs[i].ndim, axis)
  return out


def shrink_members(new: list, h: Hyperparams) -> list:
  """Γ' = κ·Prox(V') of the members of cross-leaf classes, second stage.

  Every member's step left κ·V' (:class:`~optax_splitlbi.prox.PendingProx`);
  here each class's group norms ‖V'_g‖ are summed over all its slices (members
  and norm-only) and every member is scaled by max(0, 1 − t/‖V'_g‖), the one
  shrinkage factor of its group; the entry steps are recorded per group.

  Args:
    new: every leaf's :func:`_leaf_update` result (leaf order).
    h: the step's hyperparameters (``h.count`` for the entry record).

  Returns:
    ``new`` with the members' Γ' and entry steps.
  """
  layouts = [leaf.penalty for leaf in new]
  if not penalties_lib.class_slices(layouts):
    return new
  norms = _class_norms([leaf.v for leaf in new], layouts, [leaf.axis_name for leaf in new])
  out = []
  for leaf, n in zip(new, norms):
    if n is not None:
      factor = prox_lib.LeafProx(leaf.penalty, leaf.threshold, norms=n).factors(leaf.v)
      leaf = leaf._replace(gamma=(factor * leaf.gamma).astype(leaf.gamma.dtype))
      if leaf.entry is not None:
        entered = (n > leaf.threshold) & (leaf.entry < 0)
        leaf = leaf._replace(entry=jnp.where(entered, h.count + 1, leaf.entry).astype(jnp.int32))
    out.append(leaf)
  return out


def _gamma_functions(state: SplitLBIState, layouts: list, axis_names: list) -> list:
  """Per leaf, V ↦ Γ = κ·Prox_t(V) with the state's κ and thresholds (``None`` if unpenalized).

  Members of a cross-leaf class get the group norms of the state's V over the class.
  """
  vs = params_structure(state).flatten_up_to(state.v)
  norms = _class_norms([None if pe is None else v for v, pe in zip(vs, layouts)], layouts,
                       axis_names)
  thresholds = iter(state.threshold)
  return [None if pe is None else prox_lib.LeafProx(pe, next(thresholds), ax, state.kappa, n)
          for pe, ax, n in zip(layouts, axis_names, norms)]


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def params_structure(state: SplitLBIState) -> jax.tree_util.PyTreeDef:
  """The params' tree structure, read from ``state.v`` (``MaskedNode`` leaves count)."""
  return jax.tree.structure(state.v, is_leaf=_is_masked)


def params_paths(state: SplitLBIState) -> list:
  """The key path of every params leaf, in leaf order (from ``state.v``)."""
  return [p for p, _ in jax.tree_util.tree_flatten_with_path(state.v, is_leaf=_is_masked)[0]]


def recompute_gamma(state: SplitLBIState) -> Any:
  """Γ = κ·Prox_t(V) from the state's V, κ and thresholds (paper eq. 4c).

  The Γ the last update left: equal to the stored Γ of ``store_gamma=True``,
  also when κ or λ changed between steps (``optax.inject_hyperparams``).

  Returns:
    Γ with the params' structure, ``MaskedNode`` on unpenalized leaves.
  """
  treedef = params_structure(state)
  v = treedef.flatten_up_to(state.v)
  layouts = treedef.flatten_up_to(state.penalty)
  fns = _gamma_functions(state, layouts, [()] * len(v))
  return treedef.unflatten([_MASKED if fn is None else fn(x).astype(x.dtype)
                            for x, fn in zip(v, fns)])


def _default_decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _resolve(penalty: Any, params: Any) -> list:
  """The resolved penalty of every leaf (leaf order), dtypes checked."""
  tree = penalties_lib.resolve_penalties(penalty, params)
  resolved = jax.tree.structure(params).flatten_up_to(tree)
  _checks.penalized_dtypes(params, resolved)
  return resolved


def _decay_per_leaf(weight_decay, mask, params) -> list:
  """β, or ``None`` (no decay term), for every leaf in leaf order.

  Not ``optax.add_decayed_weights``: g̃ = ∇L + β·W computed over the tree
  before the per-leaf update is materialized by XLA:CPU's multi-output fusion
  (an extra write and read of every decayed leaf), whereas inside the per-leaf
  step it joins the leaf's kernel. The mask follows optax's conventions.
  """
  if isinstance(weight_decay, (int, float)) and weight_decay == 0:
    return [None] * len(jax.tree.leaves(params))  # skip the β·W term: one read of W less
  mask = mask(params) if callable(mask) else mask
  try:  # a pytree of bools, or a prefix of one (e.g. {"Dense_0": False, "Conv_0": True})
    decayed = jax.tree.structure(params).flatten_up_to(jax.tree.broadcast(mask, params))
  except (ValueError, TypeError) as e:
    raise ValueError("splitlbi: weight_decay_mask must be a pytree of bools (or a prefix) "
                     f"matching the params, or a callable returning one: {e}") from None
  return [weight_decay if d else None for d in decayed]
