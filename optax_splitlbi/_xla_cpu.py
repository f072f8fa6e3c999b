"""Workarounds for XLA:CPU, in one place. GPU and TPU never run this code.

The update of :mod:`optax_splitlbi.transform` is written once, as the paper's
equations (:func:`~optax_splitlbi.transform.penalized_leaf_step`). On CPU that
form is slow for two reasons, each fixed here and selected by the
``xla_cpu_form`` argument of :func:`~optax_splitlbi.splitlbi`:

- ``"buffered"`` (default CPU form): XLA:CPU emits one loop per output and,
  with donated params and state, copies the old W and Γ of every leaf because
  the in-place writes of W' and Γ' race with the other loops that read them.
  Computing the coupling gradient (W − Γ)/ν once into its own buffer orders
  the reads before the writes (ResNet-50 tree update 1.6-1.9× faster).
- ``"fused"`` (chosen when XLA's CPU multi-output fusion flag is set): that
  pass makes one kernel per leaf only if the outputs share no intermediate,
  so the same equations are spelled with every shared term expanded
  (:func:`fused_penalized_leaf_step`).

Both compute the same numbers as the equations to float rounding; the tests
check every form against the same NumPy reference.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_splitlbi.prox import LeafProx

MULTI_OUTPUT_FUSION_OPTION = "xla_cpu_use_multi_output_fusion"
FORMS = ("auto", "buffered", "fused", "equations")


def multi_output_fusion_enabled() -> bool:
  """Whether ``XLA_FLAGS`` turns on XLA:CPU's multi-output fusion pass.

  The pass is off by default and only the process-wide flag
  ``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``, set before
  JAX starts, enables it: ``jit``'s ``compiler_options`` rejects that option.
  """
  return MULTI_OUTPUT_FUSION_OPTION in os.environ.get("XLA_FLAGS", "")


def resolve_form(form: str) -> str:
  """The CPU form for ``form``; ``"auto"``: fused if the flag is set, else buffered."""
  if form not in FORMS:
    raise ValueError(f"splitlbi: xla_cpu_form must be one of {FORMS}, got {form!r}.")
  if form == "auto":
    return "fused" if multi_output_fusion_enabled() else "buffered"
  return form


def own_buffer(pred: jax.Array, fn: Callable[..., jax.Array], *args) -> jax.Array:
  """``fn(*args)``, computed once into a buffer of its own (a fusion barrier).

  XLA cannot fuse through a conditional (here one whose two branches are
  ``fn``; ``pred`` is any traced bool), so the consumers read the buffer
  instead of recomputing the value from its inputs, and the data dependence
  orders the in-place writes of the donated W and Γ after every read: XLA
  inserts no copies. (``lax.optimization_barrier`` is removed before copy
  insertion.)
  """
  return jax.lax.cond(pred, fn, fn, *args)


def coupling_buffer(count: jax.Array) -> Callable[..., jax.Array]:
  """``buffer(fn, *arrays)``: on CPU ``fn(*arrays)`` in a buffer of its own
  (:func:`own_buffer`), elsewhere ``fn(*arrays)``. For the coupling gradients that a
  direction and the dual step read (``splitlbi(direction=...)``): XLA:CPU otherwise
  recomputes (W − Γ)/ν in every consumer's loop and copies the donated W and Γ."""

  def buffer(fn: Callable[..., jax.Array], *arrays) -> jax.Array:
    return jax.lax.platform_dependent(*arrays, cpu=lambda *a: own_buffer(count >= 0, fn, *a),
                                      default=fn)

  return buffer


class _GroupGamma(NamedTuple):
  """A lean group Γ = κ·s_g·V whose group factors κ·s_g were computed beforehand."""

  factor: jax.Array

  def __call__(self, v: jax.Array) -> jax.Array:
    return self.factor * v


def norms_outside(gamma_of: Optional[LeafProx], v: jax.Array) -> Any:
  """Lean group Γ with the group norms of V reduced outside the conditional: inside
  it XLA:CPU does not split the scaling loop across threads (lean ResNet-50
  update 12 % slower)."""
  if gamma_of is None or gamma_of.elementwise:
    return gamma_of
  return _GroupGamma(gamma_of.scale * gamma_of.factors(v))


def buffered_leaf_step(step_fn: Callable[..., Any], g, w, b, v, gam, dual, prox_v: LeafProx,
                       gamma_of: Optional[LeafProx], h, **options) -> Any:
  """``step_fn`` (the equations form) with the coupling gradient in its own
  buffer; the step count (``h.count``, traced) makes the predicate."""
  return step_fn(g, w, b, v, gam, dual, prox_v, norms_outside(gamma_of, v), h, **options,
                 own_buffer=functools.partial(own_buffer, h.count >= 0))


def on_cpu(cpu: Callable[..., Any], default: Callable[..., Any],
           num_arrays: int) -> Callable[..., Any]:
  """``cpu`` when lowering for CPU, ``default`` on every other platform.

  The first ``num_arrays`` arguments are arrays; the rest (functions,
  hyperparameters) are closed over.
  """

  def fn(*args):
    arrays, rest = args[:num_arrays], args[num_arrays:]
    return jax.lax.platform_dependent(*arrays, cpu=lambda *a: cpu(*a, *rest),
                                      default=lambda *a: default(*a, *rest))

  return fn


# Three exact spellings of the soft-threshold sign(v)·max(|v| − t, 0): XLA merges equal
# expressions, so each use of a lean Γ gets its own and none is shared (see below).
_SOFT_THRESHOLDS = (
    lambda v, t: jnp.sign(v) * jnp.maximum(jnp.abs(v) - t, 0),
    lambda v, t: v - jnp.clip(v, -t, t),
    lambda v, t: jnp.maximum(v - t, 0) + jnp.minimum(v + t, 0),
)


def _gamma_times(c, v, gam, gamma_of: Optional[LeafProx], spelling: int):
  """c·Γ: the stored Γ, or in lean mode κ·Prox_t(V) spelled in way ``spelling``.

  A group Γ is (κ·scale_g)·V: the per-group scales are a small array, so
  c·κ·scale_g differs for every c. A lasso Γ uses one of three soft-thresholds.
  """
  if gam is not None:
    return c * gam
  if gamma_of.elementwise:
    return (c * gamma_of.scale) * _SOFT_THRESHOLDS[spelling](v, gamma_of.threshold)
  return (c * gamma_of.scale * gamma_of.factors(v)) * v


def fused_penalized_leaf_step(g, w, b, v, gam, dual, prox_v: LeafProx,
                              gamma_of: Optional[LeafProx], h, *, nesterov: bool, coupling: str):
  r""":func:`~optax_splitlbi.transform.penalized_leaf_step`, spelled for multi-output fusion.

  With s = κα, the direction G·g̃' + B·b of the momentum step (G, B = 1, τ;
  Nesterov: 1 + τ, τ²) and c = 1 (coupling outside), G (through momentum) or 0
  (``coupling="direction"``: g is the direction of ∇_W L̄ already),
  every output is a sum of the inputs times scalars, with no common term::

      W' − W = −sG·g̃ − sB·b − (sc/ν)·W + (sc/ν)·Γ
      b'     = τ·b + g̃                    (+ W/ν − Γ/ν through the momentum)
      V'     = V + (α/ν)·(W − Γ)            (V + α·dual with a dual direction)
      Γ'     = κ·Prox(V − (α/ν)·(Γ − W))   (V' spelled apart: a lasso Γ' joins the kernel)

  The decay g̃ = g + β·W is expanded too (β joins W's coefficient), and in
  lean mode each use of Γ = κ·Prox_t(V) is spelled apart (:func:`_gamma_times`).
  Same arguments and returns as the equations form.
  """
  tau, step, beta = h.momentum, h.kappa * h.alpha, h.weight_decay or 0
  big_g, big_b = (1 + tau, tau * tau) if nesterov else (1, tau)
  if coupling == "direction":  # g = direction(∇L + (W − Γ)/ν): no coupling term in W'
    w_step = -(step * big_g) * g - (step * big_b) * b - (step * big_g * beta) * w
  else:
    c = big_g if coupling == "momentum" else 1
    c_w = step * big_g * beta + step * c / h.nu
    w_step = (-(step * big_g) * g - (step * big_b) * b - c_w * w
              + _gamma_times(step * c / h.nu, v, gam, gamma_of, 0))
  b_next = tau * b + g if h.weight_decay is None else tau * b + g + beta * w
  if coupling == "momentum":
    b_next = b_next + w / h.nu - _gamma_times(1 / h.nu, v, gam, gamma_of, 2)
  if dual is not None:  # V' = V + α·D((W − Γ)/ν), D computed before the leaf steps
    v_next = v + h.alpha * dual
    return w_step, b_next, v_next, h.kappa * prox_v(v + h.alpha * dual)
  v_next = v + (h.alpha / h.nu) * (w - _gamma_times(1, v, gam, gamma_of, 1))
  # A lasso Γ' is elementwise and joins the kernel if V' is spelled apart; a
  # group Γ' needs the norms of V' first, so it reads the kernel's V'.
  if prox_v.elementwise:
    v_prox = v - (h.alpha / h.nu) * (_gamma_times(1, v, gam, gamma_of, 2) - w)
  else:
    v_prox = v_next
  gam_next = h.kappa * prox_v(v_prox)
  return w_step, b_next, v_next, gam_next


def fused_sgd_leaf_step(g, w, b, h, *, nesterov: bool):
  """Momentum SGD at κα: ΔW = −sG·g − sB·b − sGβ·W, b' = τ·b + g + β·W (no common term)."""
  tau, step = h.momentum, h.kappa * h.alpha
  big_g, big_b = (1 + tau, tau * tau) if nesterov else (1, tau)
  w_step = -(step * big_g) * g - (step * big_b) * b
  if h.weight_decay is None:
    return w_step, tau * b + g
  return w_step - (step * big_g * h.weight_decay) * w, tau * b + g + h.weight_decay * w
