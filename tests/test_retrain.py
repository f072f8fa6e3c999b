"""Masked retraining keeps pruned entries exactly zero; rewinding applies masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as osl

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(32, 6)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, 3, size=32))


def _init():
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  return {"Dense_0": {"kernel": jax.random.normal(k0, (6, 8)), "bias": jnp.full(8, 0.1)},
          "Dense_1": {"kernel": jax.random.normal(k1, (8, 3)), "bias": jnp.zeros(3)}}


def _loss(p):
  h = jax.nn.relu(X @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def _masks():
  m0 = RNG.random((6, 8)) < 0.5
  m1 = np.array([[True, False, True]])  # keepdims: prune output neuron 1 of Dense_1
  return {"Dense_0": {"kernel": jnp.asarray(m0), "bias": None},
          "Dense_1": {"kernel": jnp.asarray(m1), "bias": None}}


def _train(opt, params, steps=100, return_state=False):
  def step(carry, _):
    p, s = carry
    u, s = opt.update(jax.grad(_loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  (p, s), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
      (params, opt.init(params)))
  return (p, s) if return_state else p


def _check_pruned_zero_and_kept_trained(p, p0, masks):
  full0 = np.broadcast_to(masks["Dense_0"]["kernel"], (6, 8))
  full1 = np.broadcast_to(masks["Dense_1"]["kernel"], (8, 3))
  for w, w0, m in [(p["Dense_0"]["kernel"], p0["Dense_0"]["kernel"], full0),
                   (p["Dense_1"]["kernel"], p0["Dense_1"]["kernel"], full1)]:
    w, w0 = np.asarray(w), np.asarray(w0)
    assert np.all(w[~m] == 0.0)                       # exactly zero
    assert np.all(w[m] != w0[m])                      # kept entries trained
  assert np.any(np.asarray(p["Dense_0"]["bias"]) != 0.1)  # None mask: leaf trained
  assert float(_loss(p)) < float(_loss(p0))


@pytest.mark.parametrize("name,inner", [
    ("sgd_momentum_wd", optax.chain(optax.add_decayed_weights(1e-2),
                                    optax.sgd(0.1, momentum=0.9, nesterov=True))),
    ("adamw", optax.adamw(1e-2, weight_decay=1e-2)),
])
def test_masked_updates_keep_zeros_for_100_steps(name, inner):
  masks = _masks()
  p0 = osl.apply_masks(_init(), masks)
  p, state = _train(optax.chain(inner, osl.masked_updates(masks)), p0, return_state=True)
  _check_pruned_zero_and_kept_trained(p, p0, masks)
  # The inner optimizer's own buffers (momentum / Adam moments) are nonzero at pruned
  # entries: without the mask those entries would move.
  pruned = ~np.asarray(masks["Dense_0"]["kernel"])
  buffers = [np.asarray(x) for x in jax.tree.leaves(state[0]) if np.shape(x) == (6, 8)]
  assert buffers and all(np.any(b[pruned] != 0) for b in buffers)


def test_projection_zeroes_unmasked_start_and_project_false_freezes():
  masks = _masks()
  p0 = _init()  # NOT masked beforehand
  opt = optax.chain(optax.adamw(1e-2, weight_decay=1e-2), osl.masked_updates(masks))
  p1 = _train(opt, p0, steps=1)
  m0 = np.asarray(masks["Dense_0"]["kernel"])
  assert np.all(np.asarray(p1["Dense_0"]["kernel"])[~m0] == 0.0)
  # project=False: pruned entries get a zero update, i.e. stay where they were.
  opt = optax.chain(optax.sgd(0.1, momentum=0.9), osl.masked_updates(masks, project=False))
  p5 = _train(opt, p0, steps=5)
  np.testing.assert_array_equal(np.asarray(p5["Dense_0"]["kernel"])[~m0],
                                np.asarray(p0["Dense_0"]["kernel"])[~m0])


def test_masks_from_support_and_prune_plug_in_swap_and_donation():
  params = {"conv": jnp.ones((1, 1, 2, 3)), "dense": jnp.ones((2, 3)), "bias": jnp.ones(3)}
  s = osl.splitlbi(0.1, record_path=True).init(params)
  s = s._replace(gamma={"conv": jnp.asarray([[[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]]]),
                        "dense": jnp.asarray([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]),
                        "bias": optax.MaskedNode()})
  supp = osl.support(s)
  opt = optax.chain(optax.sgd(0.1, momentum=0.9), osl.masked_updates(supp))
  step = jax.jit(lambda p, st: _apply(opt, p, st), donate_argnums=(0, 1))
  p, st = step(jax.tree.map(jnp.array, params), opt.init(params))
  p, st = step(p, st)
  for w, m in [(p["conv"], supp["conv"]), (p["dense"], supp["dense"])]:
    assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
    assert np.all(np.asarray(w)[np.asarray(m)] != 1.0)
    assert not m.is_deleted()  # the state holds its own copy of the masks
  # Iterative pruning: swap in prune_to_sparsity's masks through the state (no recompile).
  half = osl.prune_to_sparsity(params, s, 0.5)
  new_masks = osl.masked_updates(half).init(params)
  st = (st[0], new_masks)
  p, st = step(p, st)
  for w, m in [(p["conv"], half["conv"]), (p["dense"], half["dense"])]:
    assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)


def _apply(opt, p, st):
  g = jax.tree.map(jnp.ones_like, p)
  u, st = opt.update(g, st, p)
  return optax.apply_updates(p, u), st


def test_apply_masks_hand_values_broadcast_none_and_dtype():
  params = {"k": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) + 1, "b": jnp.ones(3)}
  masks = {"k": jnp.asarray([[True, False, True]]), "b": None}
  out = osl.apply_masks(params, masks)
  np.testing.assert_array_equal(np.asarray(out["k"], np.float32), [[1, 0, 3], [4, 0, 6]])
  assert out["k"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["b"], np.ones(3))
  out2 = jax.jit(osl.apply_masks)(params, {"k": np.array([[True, True, True], [False] * 3]),
                                           "b": False})
  np.testing.assert_array_equal(np.asarray(out2["k"], np.float32), [[1, 2, 3], [0, 0, 0]])
  np.testing.assert_array_equal(out2["b"], np.zeros(3))


def test_callable_masks():
  params = {"w": jnp.asarray([0.0, 1.0, 0.0, 2.0])}
  opt = osl.masked_updates(lambda p: jax.tree.map(lambda x: x != 0, p))
  u, _ = opt.update({"w": jnp.ones(4)}, opt.init(params), params)
  np.testing.assert_array_equal(u["w"], [0.0, 1.0, 0.0, 1.0])


def test_bad_masks_raise_naming_the_leaf():
  params = _init()
  bad_shape = _masks()
  bad_shape["Dense_1"]["kernel"] = jnp.ones((3, 8), bool)
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    osl.apply_masks(params, bad_shape)
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    osl.masked_updates(bad_shape).init(params)
  not_bool = _masks()
  not_bool["Dense_0"]["kernel"] = jnp.ones((6, 8))
  with pytest.raises(ValueError, match="Dense_0/kernel.*boolean"):
    osl.apply_masks(params, not_bool)
  with pytest.raises(ValueError, match="does not match"):
    osl.apply_masks(params, {"Dense_0": None})
  with pytest.raises(ValueError, match="does not match"):
    osl.apply_masks(params, [None, None])


def test_prefix_masks_cover_subtrees():
  params = _init()
  out = osl.apply_masks(params, {"Dense_0": None, "Dense_1": False})
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  np.testing.assert_array_equal(out["Dense_1"]["kernel"], np.zeros((8, 3)))
  np.testing.assert_array_equal(out["Dense_1"]["bias"], np.zeros(3))
  opt = osl.masked_updates({"Dense_0": None, "Dense_1": {"kernel": False, "bias": None}})
  u, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params))
  np.testing.assert_array_equal(u["Dense_0"]["kernel"], np.ones((6, 8)))
  np.testing.assert_array_equal(u["Dense_1"]["kernel"], np.zeros((8, 3)))
  np.testing.assert_array_equal(u["Dense_1"]["bias"], np.ones(3))
