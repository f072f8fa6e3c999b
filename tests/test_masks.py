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


def test_store_gamma_false_under_inject_hyperparams_uses_current_lam():
  params = _params()
  inj = optax.inject_hyperparams(osl.splitlbi, static_args=("store_gamma",))(
      learning_rate=0.1, kappa=2.0, lam=1.0, store_gamma=False)
  s = jax.jit(inj.init)(params)  # κ, λ traced at init: only the hyperparams dict knows them
  assert osl.find_state(s).hyper.kappa is None
  s = s._replace(inner_state=_set_v(s.inner_state))
  np.testing.assert_allclose(osl.gamma(s)["dense"]["kernel"], _expected_gamma(2.0, 1.0)[1])
  # Edit λ in the hyperparams dict: Γ follows the current value.
  s.hyperparams["lam"] = jnp.asarray(0.25)
  g_conv, g_dense = _expected_gamma(2.0, 0.25)
  g = jax.jit(osl.gamma)(s)
  np.testing.assert_allclose(g["conv"]["kernel"], g_conv, rtol=1e-6)
  np.testing.assert_allclose(g["dense"]["kernel"], g_dense, rtol=1e-6)
  m = osl.support(s)
  np.testing.assert_array_equal(m["conv"]["kernel"][0, 0, 0], [True, True, True])
  np.testing.assert_array_equal(m["dense"]["kernel"], [[True, True, True], [True, False, False]])
  assert float(osl.hyperparams(s)["kappa"]) == 2.0


def test_store_gamma_false_with_traced_kappa_raises():
  params = _params()
  s = jax.jit(lambda k: osl.splitlbi(0.1, kappa=k, store_gamma=False).init(params))(2.0)
  with pytest.raises(ValueError, match="store_gamma"):
    osl.gamma(s)


def test_support_group_layouts_input_channels_and_heads():
  # Input-channel groups of an HWIO kernel: reduce (kh, kw, cout).
  params = {"k": jnp.zeros((1, 1, 2, 3)), "h": jnp.zeros((2, 3, 2))}
  pen = {"k": osl.conv_input_channels(), "h": osl.attention_heads()}
  s = osl.splitlbi(0.1, penalty=pen).init(params)
  g_k = np.zeros((1, 1, 2, 3), np.float32)
  g_k[0, 0, 1, 2] = 1e-3   # only input channel 1 nonzero
  g_h = np.zeros((2, 3, 2), np.float32)
  g_h[1, 0, 1] = -4.0      # head 0
  g_h[0, 2, 0] = 2.0       # head 2
  s = s._replace(gamma={"k": jnp.asarray(g_k), "h": jnp.asarray(g_h)})
  m = osl.support(s)
  want_k = np.zeros((1, 1, 2, 3), bool)
  want_k[:, :, 1, :] = True
  want_h = np.zeros((2, 3, 2), bool)
  want_h[:, [0, 2], :] = True
  np.testing.assert_array_equal(m["k"], want_k)
  np.testing.assert_array_equal(m["h"], want_h)
  assert osl.group_support(s)["h"].shape == (1, 3, 1)


def test_find_state_errors():
  with pytest.raises(ValueError, match="found 0"):
    osl.find_state(optax.sgd(0.1).init({"w": jnp.zeros(2)}))
  s = osl.splitlbi(0.1).init({"w": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="found 2"):
    osl.find_state((s, s))


def test_map_penalized_and_penalized_leaves():
  params = _params()
  s = osl.splitlbi(0.1).init(params)
  out = osl.map_penalized(lambda pe, v, w: (pe.kind, w.shape), s, params)
  assert out["conv"]["kernel"] == ("group", (1, 1, 2, 3))
  assert out["dense"]["kernel"] == ("lasso", (2, 3))
  assert out["conv"]["bias"] is None
  info = osl.penalized_leaves(s)
  assert [(n, i, pe.kind, shape) for n, i, pe, shape in info] == [
      ("conv/kernel", 1, "group", (1, 1, 2, 3)), ("dense/kernel", 3, "lasso", (2, 3))]
