"""Proximal operators of the sparsity penalties (paper eqs. 4c and 5).

Γ = κ·Prox_{λΩ}(V) with Prox_{λΩ}(V) = argmin_Γ ½‖Γ − V‖² + λΩ(Γ):

- lasso:        Prox(V)ᵢ  = sign(Vᵢ)·max(|Vᵢ| − λ, 0)
- group lasso:  Prox(V)_g = max(0, 1 − λ/‖V_g‖₂)·V_g      (0 when V_g = 0)

The per-group operator is written once, on a single group, and
:func:`group_map` vmaps it over the group-index axes, so any group layout
(filters, input channels, neurons, heads) uses the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_splitlbi.penalties import LeafPenalty


def soft_threshold(v: jax.Array, lam) -> jax.Array:
  """Elementwise soft-threshold sign(v)·max(|v| − λ, 0), the ℓ₁ prox."""
  return jnp.sign(v) * jnp.maximum(jnp.abs(v) - lam, 0)


def _norm(g: jax.Array, axis_name: Any = None) -> jax.Array:
  """‖g‖₂ in at least float32, with a finite gradient at g = 0 (double where).

  With ``axis_name`` (inside ``shard_map``) ``g`` is this device's part of a
  group split over those mesh axes: ‖g‖² = psum of the local ‖g_shard‖².
  """
  sq = jnp.sum(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32))))
  if axis_name:
    sq = jax.lax.psum(sq, axis_name)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1)), 0)


def _group_scale(norm: jax.Array, lam) -> jax.Array:
  """max(0, 1 − λ/‖v‖), exactly 0 (never NaN) when ‖v‖ = 0."""
  safe = jnp.where(norm > 0, norm, 1)
  # λ = 0 is the identity, even where ‖v‖² underflows to 0.
  return jnp.where(norm > lam, 1 - lam / safe, jnp.where(lam == 0, 1, 0))


def group_soft_threshold(v: jax.Array, lam, axis_name: Any = None) -> jax.Array:
  """The ℓ₂ prox of ONE group: max(0, 1 − λ/‖v‖₂)·v, with 0 for v = 0.

  Args:
    v: the entries of one group, any shape.
    lam: threshold λ ≥ 0.
    axis_name: inside ``shard_map``, the mesh axis name(s) the group is split
      over (its squared norm is psum-reduced over them); ``None``: ``v`` is
      the whole group (also under ``jit``, where GSPMD reduces globally).
  Returns:
    The shrunk group, same shape and dtype as ``v``.
  """
  return (_group_scale(_norm(v, axis_name), lam) * v).astype(v.dtype)


def group_map(fn: Callable[..., jax.Array], x: jax.Array,
              reduce_axes: Sequence[int], *args) -> jax.Array:
  """Applies ``fn(group, *args)`` to every group of ``x`` via nested vmap.

  Args:
    fn: a function of one group (an array with the ``reduce_axes`` dims)
      returning an array of the group's shape, or a scalar.
    x: the full array.
    reduce_axes: the non-negative axes that form one group.
    *args: extra unbatched arguments for ``fn``.

  Returns:
    ``fn`` applied per group, the group-index axes kept in place (a scalar
    ``fn`` gives those axes only, with size-1 dims where ``reduce_axes`` are).
  """
  kept = [a for a in range(x.ndim) if a not in set(reduce_axes)]

  def per_group(g, *a):
    out = fn(g, *a)
    # A scalar per group keeps the reduced dims as 1s (keepdims layout).
    return jnp.reshape(out, (1,) * g.ndim) if out.ndim == 0 else out

  f = per_group
  for i, a in reversed(list(enumerate(kept))):
    f = jax.vmap(f, in_axes=(a - i,) + (None,) * len(args), out_axes=a - i)
  return f(x, *args)


def group_norms(x: jax.Array, reduce_axes: Sequence[int],
                axis_name: Any = None) -> jax.Array:
  """‖x_g‖₂ per group, keepdims layout (size-1 dims at ``reduce_axes``).

  ``axis_name``: as in :func:`group_soft_threshold` (groups split by shard_map).
  """
  return group_map(lambda g: _norm(g, axis_name), x, reduce_axes)


def group_scales(x: jax.Array, reduce_axes: Sequence[int], lam,
                 axis_name: Any = None) -> jax.Array:
  """max(0, 1 − λ/‖x_g‖₂) per group (keepdims), so that Prox(x) = scales·x."""
  return group_map(lambda g: _group_scale(_norm(g, axis_name), lam), x, reduce_axes)


def slice_sq_norms(x: jax.Array, axis: int, axis_name: Any = None) -> jax.Array:
  """Σ x² over every axis but ``axis`` (float32 or wider): a leaf's share of the squared
  norms of the cross-leaf groups that ``axis`` indexes (keepdims layout)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sq = jnp.sum(jnp.square(x), tuple(a for a in range(x.ndim) if a != axis), keepdims=True)
  return jax.lax.psum(sq, axis_name) if axis_name else sq


def shared_norms(slices: Sequence[jax.Array]) -> jax.Array:
  """‖V_g‖₂ of cross-leaf groups from every member's :func:`slice_sq_norms` (a vector)."""
  sq = sum(jnp.reshape(s, (-1,)) for s in slices)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1)), 0)


def penalty_norms(x: jax.Array, penalty: LeafPenalty) -> jax.Array:
  """‖x_g‖₂ per group of ``penalty`` (keepdims layout); |xᵢ| (float32) for lasso."""
  if penalty.kind == "lasso":
    return jnp.abs(x).astype(jnp.float32)
  return group_norms(x, penalty.reduce_axes)


def prox(v: jax.Array, penalty: LeafPenalty, threshold, axis_name: Any = None) -> jax.Array:
  """Prox_{tΩ}(v) of one leaf under its penalty layout (paper eqs. 4c, 5).

  Args:
    v: the leaf's V.
    penalty: the leaf's :class:`LeafPenalty` (lasso or group layout).
    threshold: t, the leaf's threshold (λ, or λ·√d for a normalized group).
    axis_name: the mesh axes that split this leaf's groups inside
      ``shard_map`` (see :func:`group_soft_threshold`); ``None`` otherwise.
  """
  if penalty.kind == "lasso":
    return soft_threshold(v, threshold)
  return group_map(lambda g: group_soft_threshold(g, threshold, axis_name), v,
                   penalty.reduce_axes)


def active(v: jax.Array, penalty: LeafPenalty, threshold, axis_name: Any = None) -> jax.Array:
  """Which groups (keepdims layout) or entries of Prox_t(v) are nonzero: ‖v_g‖ > t."""
  if penalty.kind == "lasso":
    return jnp.abs(v) > threshold
  return group_norms(v, penalty.reduce_axes, axis_name) > threshold


@dataclasses.dataclass(frozen=True)
class LeafProx:
  """c·Prox_{tΩ} of one leaf as a function of V (``LeafProx(penalty, t)(v)``).

  Attributes:
    penalty: the leaf's :class:`LeafPenalty`.
    threshold: t.
    axis_name: mesh axes splitting the leaf's groups inside ``shard_map``.
    scale: c (e.g. κ, for Γ = κ·Prox_t(V)).
    norms: for a member of a cross-leaf class, ‖V_g‖₂ of the class's groups over
      all members (keepdims layout of this leaf), computed beforehand from the V
      the prox is applied to; ``None`` for a per-leaf penalty.
  """

  penalty: LeafPenalty
  threshold: Any
  axis_name: Any = None
  scale: Any = 1
  norms: Any = None

  def __call__(self, v: jax.Array) -> jax.Array:
    if self.norms is None:
      out = prox(v, self.penalty, self.threshold, self.axis_name)
    else:  # a cross-leaf group: max(0, 1 − t/‖V_g‖)·V_m with the norm over all members
      out = (self.factors(v) * v).astype(v.dtype)
    return out if isinstance(self.scale, int) and self.scale == 1 else self.scale * out

  def factors(self, v: jax.Array) -> jax.Array:
    """max(0, 1 − t/‖v_g‖₂) per group (keepdims), so that Prox(v) = factors·v."""
    if self.norms is not None:
      return _group_scale(self.norms, self.threshold)
    return group_scales(v, self.penalty.reduce_axes, self.threshold, self.axis_name)

  def active(self, v: jax.Array) -> jax.Array:
    """Which groups (keepdims) or entries of Prox_t(v) are nonzero: ‖v_g‖ > t."""
    if self.norms is not None:
      return self.norms > self.threshold
    return active(v, self.penalty, self.threshold, self.axis_name)

  @property
  def elementwise(self) -> bool:
    """Whether the prox acts entry by entry (lasso), needing no group norms."""
    return self.penalty.kind == "lasso"


@dataclasses.dataclass(frozen=True)
class PendingProx:
  """The prox of a member of a cross-leaf class, first stage: V' as it is.

  A class's group norms need every member's V' first, so the leaf step returns
  κ·V' and :func:`shrink_members` then scales every member by the factors
  max(0, 1 − t/‖V'_g‖) of its class (one factor per group over all members).
  """

  elementwise = False

  def __call__(self, v: jax.Array) -> jax.Array:
    return v
