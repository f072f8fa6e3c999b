"""Masks read from hand-built Γ / V values (paper Sec. 4: W* = W ∘ 1[Γ ≠ 0])."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as osl

# Conv kernel (1, 1, cin=2, cout=3): Γ per output filter (column of the last axis).
GAMMA_CONV = np.array([[[[1.0, 0.0, 0.0],
                         [0.0, 0.0, -2.0]]]], np.float32)  # filters 0, 2 nonzero
SUPP_CONV = np.array([[[[True, False, True],
                        [True, False, True]]]])             # filter 2's zero entry kept
GAMMA_DENSE = np.array([[0.0, 1.5, 0.0],
                        [-2.0, 0.0, 0.0]], np.float32)
SUPP_DENSE = GAMMA_DENSE != 0


def _params():
  return {"conv": {"kernel": jnp.full((1, 1, 2, 3), 3.0), "bias": jnp.ones(3)},
          "dense": {"kernel": jnp.full((2, 3), 5.0), "bias": jnp.ones(3)}}


def _with_gamma(state):
  return state._replace(gamma={"conv": {"kernel": jnp.asarray(GAMMA_CONV),
                                        "bias": optax.MaskedNode()},
                               "dense": {"kernel": jnp.asarray(GAMMA_DENSE),
                                         "bias": optax.MaskedNode()}})


def _check_support(m):
  assert m["conv"]["bias"] is None and m["dense"]["bias"] is None
  np.testing.assert_array_equal(m["conv"]["kernel"], SUPP_CONV)
  np.testing.assert_array_equal(m["dense"]["kernel"], SUPP_DENSE)
  assert m["conv"]["kernel"].dtype == jnp.bool_


def test_support_and_sparse_params_from_hand_gamma():
  params = _params()
  state = _with_gamma(osl.splitlbi(0.1).init(params))
  _check_support(osl.support(state))
  _check_support(jax.jit(osl.support)(state))
  gs = osl.group_support(state)
  np.testing.assert_array_equal(gs["conv"]["kernel"], [[[[True, False, True]]]])
  np.testing.assert_array_equal(gs["dense"]["kernel"], SUPP_DENSE)
  w = osl.sparse_params(params, state)
  np.testing.assert_array_equal(w["conv"]["kernel"], np.where(SUPP_CONV, 3.0, 0.0))
  np.testing.assert_array_equal(w["dense"]["kernel"], np.where(SUPP_DENSE, 5.0, 0.0))
  np.testing.assert_array_equal(w["conv"]["bias"], np.ones(3))  # unpenalized: unchanged


def test_support_inside_chain_and_inject_hyperparams():
  params = _params()
  chain = optax.chain(optax.clip_by_global_norm(1.0), osl.splitlbi(0.1))
  cs = chain.init(params)
  cs = (cs[0], _with_gamma(cs[1]))
  _check_support(osl.support(cs))
  inj = optax.inject_hyperparams(osl.splitlbi)(learning_rate=0.1)
  s = inj.init(params)
  s = s._replace(inner_state=_with_gamma(s.inner_state))
  _check_support(osl.support(s))
  _check_support(jax.jit(osl.support)(s))


def _v_tree():
  # conv filters: ‖(3,4)‖ = 5, ‖(.3,.4)‖ = .5, ‖(0,-2)‖ = 2.
  v_conv = np.array([[[[3.0, 0.3, 0.0],
                        [4.0, 0.4, -2.0]]]], np.float32)
  v_dense = np.array([[0.5, -1.5, 1.0],
                      [3.0, -0.2, 0.0]], np.float32)
  return v_conv, v_dense


def _set_v(state):
  v_conv, v_dense = _v_tree()
  return state._replace(v={"conv": {"kernel": jnp.asarray(v_conv), "bias": optax.MaskedNode()},
                           "dense": {"kernel": jnp.asarray(v_dense),
                                     "bias": optax.MaskedNode()}})


def _expected_gamma(kappa, lam):
  """Hand computation of κ·Prox_λ(V): group scale max(0, 1 − λ/‖V_g‖), soft-threshold."""
  v_conv, v_dense = _v_tree()
  norms = np.array([5.0, 0.5, 2.0])
  scale = np.maximum(0, 1 - lam / norms)
  g_conv = kappa * v_conv * scale
  g_dense = kappa * np.sign(v_dense) * np.maximum(np.abs(v_dense) - lam, 0)
  return g_conv, g_dense


def test_store_gamma_false_recomputes_gamma():
  params = _params()
  state = _set_v(osl.splitlbi(0.1, kappa=2.0, lam=1.0, store_gamma=False).init(params))
  assert state.gamma is None
  g = osl.gamma(state)
  g_conv, g_dense = _expected_gamma(2.0, 1.0)
  # λ = 1: conv filter 0 → 2·0.8·(3, 4) = (4.8, 6.4); dense → 2·[[0, −.5, 0], [2, 0, 0]].
  np.testing.assert_allclose(g_conv[0, 0, :, 0], [4.8, 6.4], rtol=1e-6)
  np.testing.assert_allclose(g["conv"]["kernel"], g_conv, rtol=1e-6)
  np.testing.assert_allclose(g["dense"]["kernel"], [[0, -1, 0], [4, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(g["dense"]["kernel"], g_dense, rtol=1e-6)
  m = osl.support(state)
  np.testing.assert_array_equal(m["conv"]["kernel"][0, 0, 0], [True, False, True])
  np.testing.assert_array_equal(m["dense"]["kernel"], [[False, True, False],
                                                       [True, False, False]])


def test_lean_gamma_is_the_gamma_of_the_last_update_under_inject_hyperparams():
  params = _params()
  inject = optax.inject_hyperparams(osl.splitlbi, static_args=("store_gamma",))
  lean = inject(learning_rate=0.1, kappa=2.0, lam=1.0, store_gamma=False)
  s = jax.jit(lean.init)(params)  # κ, λ traced at init: the state holds their values
  s = s._replace(inner_state=_set_v(s.inner_state))
  g_conv, g_dense = _expected_gamma(2.0, 1.0)
  g = jax.jit(osl.gamma)(s)
  np.testing.assert_allclose(g["conv"]["kernel"], g_conv, rtol=1e-6)
  np.testing.assert_allclose(g["dense"]["kernel"], g_dense, rtol=1e-6)
  # Edit λ between steps: the next update uses it for Γ' (as stored mode does), while
  # the coupling of that update still uses the Γ of the last one (λ = 1).
  stored = inject(learning_rate=0.1, kappa=2.0, lam=1.0, store_gamma=True)
  t = stored.init(params)
  t = t._replace(inner_state=_set_v(t.inner_state)._replace(gamma={
      k: {"kernel": g[k]["kernel"], "bias": optax.MaskedNode()} for k in g}))
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  for state in (s, t):
    state.hyperparams["lam"] = jnp.asarray(0.25)
  _, s = lean.update(grads, s, params)
  _, t = stored.update(grads, t, params)
  np.testing.assert_allclose(np.asarray(osl.find_state(s).threshold), [0.25, 0.25])
  for a, b in zip(jax.tree.leaves(osl.gamma(s)), jax.tree.leaves(osl.gamma(t))):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # By hand: V' = V + (α/ν)(W − Γ) with ν = 100, then Γ' = 2·Prox_0.25(V').
  v_conv, v_dense = _v_tree()
  v_dense_next = v_dense + 0.1 / 100 * (5.0 - g_dense)
  np.testing.assert_allclose(osl.find_state(s).v["dense"]["kernel"], v_dense_next, rtol=1e-6)
  np.testing.assert_allclose(
      osl.gamma(s)["dense"]["kernel"],
      2.0 * np.sign(v_dense_next) * np.maximum(np.abs(v_dense_next) - 0.25, 0), rtol=1e-5)
