"""Proximal operators: optimality (KKT) conditions, zero groups, shrinkage."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optax_splitlbi.penalties import GroupLasso, dense_neurons, resolve_leaf
from optax_splitlbi.prox import (group_map, group_norms, group_scales, group_soft_threshold,
                                 penalty_norms, prox, soft_threshold)


def _prox(v, spec, lam):
  """Prox under ``spec`` resolved against ``v``'s shape, at the global λ ``lam``."""
  r = resolve_leaf(spec, v.shape, "v")
  return prox(v, r.layout, r.threshold(lam))

floats = st.floats(-5, 5, allow_nan=False, allow_subnormal=False, width=32)
lams = st.floats(0, 3, allow_nan=False, allow_subnormal=False, width=32)
settings.register_profile("explore", max_examples=2000, deadline=None)
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=5), elements=floats), lams)
def test_soft_threshold_kkt(v, lam):
  """x = Prox_{λ‖·‖₁}(v) iff v − x ∈ λ·∂‖x‖₁."""
  x = np.asarray(soft_threshold(jnp.asarray(v), lam))
  r = v - x
  nz = x != 0
  np.testing.assert_allclose(r[nz], lam * np.sign(x[nz]), atol=1e-5)
  assert np.all(np.abs(r[~nz]) <= lam + 1e-6)
  assert np.all(np.abs(x) <= np.abs(v))  # shrinkage (elementwise: exact)


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5)),
                  elements=floats), lams)
def test_group_prox_kkt_per_group(v, lam):
  """x_g = Prox(v)_g iff v_g − x_g = λ x_g/‖x_g‖ (x_g ≠ 0) or ‖v_g‖ ≤ λ (x_g = 0)."""
  x = np.asarray(_prox(jnp.asarray(v), GroupLasso((0, 1)), lam))
  assert np.isfinite(x).all()
  for j in range(v.shape[-1]):
    vg, xg = v[..., j].astype(np.float64), x[..., j].astype(np.float64)
    nx, nv = np.linalg.norm(xg), np.linalg.norm(vg)
    if nx > 0:
      np.testing.assert_allclose(vg - xg, lam * xg / nx, atol=1e-4)
      assert nv > lam
    else:
      assert nv <= lam * (1 + 1e-6)
    assert nx <= nv * (1 + 1e-5) + 1e-6  # shrinkage never increases the norm


def test_group_prox_hand_values():
  v = jnp.zeros((2, 1, 1, 3)).at[:, 0, 0, 0].set(jnp.array([3.0, 4.0]))  # ‖v_0‖ = 5
  v = v.at[:, 0, 0, 1].set(jnp.array([0.3, 0.4]))  # ‖v_1‖ = 0.5 ≤ λ
  x = np.asarray(_prox(v, "group", 1.0))
  np.testing.assert_allclose(x[:, 0, 0, 0], [3 * 0.8, 4 * 0.8], rtol=1e-6)  # (1 − 1/5)·v
  assert np.all(x[..., 1:] == 0)  # below threshold, and an exactly-zero group


def test_normalized_threshold_is_lambda_sqrt_d():
  v = jnp.ones((2, 2, 1, 2)) * jnp.array([0.4, 0.6])  # ‖v_g‖ = 0.8 / 1.2, d = 4
  x = np.asarray(_prox(v, GroupLasso(normalized=True), 0.5))  # threshold 0.5·2 = 1
  assert np.all(x[..., 0] == 0)
  np.testing.assert_allclose(x[..., 1], 0.6 * (1 - 1 / 1.2), rtol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_zero_group_is_exactly_zero_and_gradient_free_of_nan(lam):
  v = jnp.zeros((3, 3, 2, 2))
  assert np.all(np.asarray(_prox(v, "group", lam)) == 0)
  g = jax.grad(lambda z: jnp.sum(_prox(z, "group", lam)))(v)
  assert np.isfinite(np.asarray(g)).all()


def test_group_map_matches_manual_loop():
  x = jax.random.normal(jax.random.key(0), (3, 4, 5))
  out = group_map(group_soft_threshold, x, (0, 2), 1.5)
  for j in range(4):
    np.testing.assert_allclose(out[:, j, :], group_soft_threshold(x[:, j, :], 1.5), rtol=1e-6)
  norms = group_norms(x, (0, 2))
  assert norms.shape == (1, 4, 1)
  np.testing.assert_allclose(norms.ravel(), np.linalg.norm(np.asarray(x).transpose(1, 0, 2)
                                                           .reshape(4, -1), axis=1), rtol=1e-6)


def test_penalty_norms_per_group_and_per_entry():
  x = jnp.array([[3.0, -1.0], [4.0, 0.0]])
  groups = np.asarray(penalty_norms(x, resolve_leaf(dense_neurons(), x.shape, "x").layout))
  np.testing.assert_allclose(groups, [[5.0, 1.0]])  # ‖column‖₂, keepdims layout
  entries = np.asarray(penalty_norms(x, resolve_leaf("lasso", x.shape, "x").layout))
  np.testing.assert_array_equal(entries, [[3.0, 1.0], [4.0, 0.0]])


def test_group_scales_hand_values():
  # Filters (last axis) with norms 5, 0.5, 0 and 2, λ = 1: max(0, 1 − λ/‖v_g‖).
  v = np.zeros((2, 1, 1, 4), np.float32)
  v[:, 0, 0, 0], v[:, 0, 0, 1], v[:, 0, 0, 3] = [3.0, 4.0], [0.3, 0.4], [0.0, 2.0]
  scales = np.asarray(group_scales(jnp.asarray(v), (0, 1, 2), 1.0))
  assert scales.shape == (1, 1, 1, 4)
  np.testing.assert_allclose(scales[0, 0, 0], [0.8, 0.0, 0.0, 0.5], rtol=1e-6)
  # λ = 0 is the identity, zero groups included.
  np.testing.assert_array_equal(group_scales(jnp.asarray(v), (0, 1, 2), 0.0), 1.0)
