"""Memory modes of splitlbi: lean (store_gamma=False), mixed precision, donation.

- Lean mode recomputes Γ = κ·Prox(V) instead of storing it: the same W, V, Γ
  as the default mode, with 2× instead of 3× parameter bytes of state.
- ``state_dtype=float32`` with bf16 parameters keeps b, V, Γ in f32 and makes
  the same support decisions as all-f32 training.
- Params and state can be donated: every state leaf is its own buffer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as osl

LR, KAPPA, NU, LAM = 0.1, 1.0, 1.0, 1.0
STEPS = 25
# Per-filter target norms: clearly inside (≥ 2) or clearly outside (≤ 0.02)
# the support after STEPS steps (V_g grows by about α/ν·‖W_g‖ per step vs λ = 1).
FILTER_NORMS = np.array([3.0, 0.01, 2.0, 0.02, 2.5, 0.01], np.float32)
DENSE_BIG = 1.5


def _targets():
  """Targets T of the quadratic loss ½‖W − T‖²: conv groups and dense entries."""
  rng = np.random.default_rng(0)
  conv = rng.normal(size=(3, 3, 2, FILTER_NORMS.size)).astype(np.float32)
  conv *= FILTER_NORMS / np.linalg.norm(conv.reshape(-1, FILTER_NORMS.size), axis=0)
  dense = np.where(rng.random((4, 3)) < 0.5, DENSE_BIG, 0.01).astype(np.float32)
  dense *= np.sign(rng.normal(size=(4, 3))).astype(np.float32)
  bias = rng.normal(size=(3,)).astype(np.float32)
  return {"conv": {"kernel": conv}, "dense": {"kernel": dense, "bias": bias}}


def _zeros_like(tree, dtype=jnp.float32):
  return jax.tree.map(lambda t: jnp.zeros(t.shape, dtype), tree)


def _run(opt, params, targets, steps=STEPS):
  """``steps`` donated, jitted steps on L(W) = ½‖W − T‖²; returns (params, state)."""

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda w, t: (w.astype(jnp.float32) - t).astype(w.dtype),
                         params, targets)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _leaf_bytes(x):
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _field_bytes(tree):
  return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def test_lean_mode_matches_default(update_form):
  targets = _targets()
  p_def, s_def = _run(osl.splitlbi(LR, KAPPA, NU, LAM, xla_cpu_form=update_form),
                      _zeros_like(targets), targets)
  p_lean, s_lean = _run(osl.splitlbi(LR, KAPPA, NU, LAM, store_gamma=False,
                                     xla_cpu_form=update_form), _zeros_like(targets), targets)
  assert s_lean.gamma is None
  for a, b in zip(jax.tree.leaves(p_def), jax.tree.leaves(p_lean)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s_def.v), jax.tree.leaves(s_lean.v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  g_def, g_lean = osl.gamma(s_def), osl.gamma(s_lean)
  for a, b in zip(jax.tree.leaves(g_def), jax.tree.leaves(g_lean)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The comparison is not vacuous: Γ has both zero and nonzero groups.
  norms = np.linalg.norm(np.asarray(g_def["conv"]["kernel"]).reshape(-1, FILTER_NORMS.size), axis=0)
  np.testing.assert_array_equal(norms > 0, FILTER_NORMS > 1)


@pytest.mark.parametrize("store_gamma,factor", [(True, 3), (False, 2)])
def test_state_bytes_per_param_byte(store_gamma, factor):
  params = _zeros_like(_targets())
  state = osl.splitlbi(LR, store_gamma=store_gamma).init(params)
  penalized = [params["conv"]["kernel"], params["dense"]["kernel"]]
  unpenalized = [params["dense"]["bias"]]
  pen_bytes = sum(_leaf_bytes(x) for x in penalized)
  unpen_bytes = sum(_leaf_bytes(x) for x in unpenalized)
  # Penalized leaves keep b, V (and Γ); unpenalized leaves keep only b.
  pen_state = sum(_leaf_bytes(t["conv"]["kernel"]) + _leaf_bytes(t["dense"]["kernel"])
                  for t in [state.momentum, state.v] + ([state.gamma] if store_gamma else []))
  assert pen_state == factor * pen_bytes
  assert _field_bytes(state.v) == pen_bytes
  assert _field_bytes(state.momentum) == pen_bytes + unpen_bytes
  # Every array leaf: count, κ and one threshold per penalized leaf are 4 bytes each.
  scalars = 4 * (2 + len(penalized))
  total = _field_bytes(state)
  assert total == factor * pen_bytes + unpen_bytes + scalars
  assert total <= factor * (pen_bytes + unpen_bytes) + scalars


@pytest.mark.parametrize("store_gamma", [True, False])
def test_state_bytes_with_a_direction(store_gamma):
  """With an Adam direction there is no momentum buffer: V (and Γ) on penalized
  leaves plus Adam's μ and ν on every leaf."""
  params = _zeros_like(_targets())
  state = osl.splitlbi(LR, store_gamma=store_gamma, direction=optax.scale_by_adam()).init(params)
  pen_bytes = _leaf_bytes(params["conv"]["kernel"]) + _leaf_bytes(params["dense"]["kernel"])
  all_bytes = pen_bytes + _leaf_bytes(params["dense"]["bias"])
  assert _field_bytes(state.momentum) == 0
  assert _field_bytes(state.direction) == 2 * all_bytes + 4  # μ, ν and Adam's int32 count
  scalars = 4 * (2 + 2)  # count, κ, one threshold per penalized leaf
  assert _field_bytes(state) == (2 if store_gamma else 1) * pen_bytes + 2 * all_bytes + 4 + scalars


def test_bf16_params_f32_state_same_support_as_f32(update_form):
  targets = _targets()
  p32, s32 = _run(osl.splitlbi(LR, KAPPA, NU, LAM, xla_cpu_form=update_form),
                  _zeros_like(targets), targets)
  p16, s16 = _run(osl.splitlbi(LR, KAPPA, NU, LAM, state_dtype=jnp.float32,
                               xla_cpu_form=update_form),
                  _zeros_like(targets, jnp.bfloat16), targets)
  for x in jax.tree.leaves(p16):
    assert x.dtype == jnp.bfloat16
  for field in (s16.momentum, s16.v, s16.gamma):
    for x in jax.tree.leaves(field):
      assert x.dtype == jnp.float32
  sup32, sup16 = osl.support(s32), osl.support(s16)
  for a, b in zip(jax.tree.leaves(sup32), jax.tree.leaves(sup16)):
    np.testing.assert_array_equal(a, b)
  # Expected support from the construction: big filters / entries only.
  conv_sup = np.asarray(sup16["conv"]["kernel"]).reshape(-1, FILTER_NORMS.size).all(axis=0)
  np.testing.assert_array_equal(conv_sup, FILTER_NORMS > 1)
  np.testing.assert_array_equal(np.asarray(sup16["dense"]["kernel"]),
                                np.abs(targets["dense"]["kernel"]) > 1)
  # bf16 weights track the f32 ones to bf16 precision.
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    np.testing.assert_allclose(np.asarray(b, np.float32), a, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs", [
    {}, {"store_gamma": False}, {"record_path": True}, {"state_dtype": jnp.float32}])
def test_donation_every_leaf_its_own_buffer(kwargs):
  targets = _targets()
  opt = osl.splitlbi(LR, KAPPA, NU, LAM, weight_decay=1e-4, **kwargs)
  params = _zeros_like(targets)
  state = opt.init(params)
  leaves = jax.tree.leaves((params, state))
  pointers = [x.unsafe_buffer_pointer() for x in leaves]
  assert len(set(pointers)) == len(pointers)

  def step(params, state):
    grads = jax.tree.map(lambda w, t: w - t, params, targets)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  for _ in range(2):
    old = jax.tree_util.tree_flatten_with_path((params, state))[0]
    params, state = step(params, state)
    jax.block_until_ready((params, state))
    # Donated, and no "buffer donated" error. With Γ stored, the update writes
    # κ and the thresholds but never reads them: jit drops them from its inputs.
    kept = [jax.tree_util.keystr(k) for k, x in old if not x.is_deleted()]
    assert kept == ([] if kwargs.get("store_gamma") is False
                    else ["[1].kappa", "[1].threshold"]), kept
  assert int(state.count) == 2
