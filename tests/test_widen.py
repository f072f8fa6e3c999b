"""Widening (issue 19): more channels, the same function; the optimizer state continues.

The function is checked against the *old* model on fresh random inputs (not the
sample the widening traced), new entries against the hand rule (outgoing zero,
BatchNorm identity, incoming at the init scale), and the SplitLBI step after
widening against the step without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_splitlbi as sl
from examples import models
from examples.transformers_nnx import GPT as NnxGPT


def _randomize(variables, seed=2):
  """Perturbs every leaf (BatchNorm statistics included) so no entry is trivial."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([a + 0.2 * jax.random.normal(k, a.shape, a.dtype)
                            for a, k in zip(leaves, keys)])


def _resnet():
  m = models.get_model("resnet20", 10, width=4, blocks_per_stage=2)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  v = jax.jit(lambda: _randomize(m.init(jax.random.key(1), x, train=False)))()
  v["batch_stats"] = jax.tree.map(jnp.abs, v["batch_stats"])  # variances > 0
  return m, v, x


def test_resnet_residual_inner_and_last_classes_keep_the_function():
  m, v, x = _resnet()
  extra = {"BasicBlock_0/Conv_1": 3,          # stage 1's residual channels (stem too)
           "BasicBlock_3/Conv_0": 2,          # an inner class
           ("BasicBlock_4/proj_conv/kernel", 3): 5}  # the last stage, by (path, axis)
  wide = sl.widen_linen(m, v, extra, x, key=jax.random.key(3), train=False)
  assert wide.classes == {"BasicBlock_0/Conv_1": (4, 7), "BasicBlock_3/Conv_0": (8, 10),
                          ("BasicBlock_4/proj_conv/kernel", 3): (16, 21)}
  p, s = wide.variables["params"], wide.variables["batch_stats"]
  assert p["Conv_0"]["kernel"].shape == (3, 3, 3, 7)          # the stem is in stage 1
  assert p["BasicBlock_1"]["Conv_1"]["kernel"].shape == (3, 3, 4, 7)
  assert p["BasicBlock_2"]["proj_conv"]["kernel"].shape == (1, 1, 7, 8)
  assert p["BasicBlock_3"]["Conv_1"]["kernel"].shape == (3, 3, 10, 8)
  assert p["Dense_0"]["kernel"].shape == (21, 10)
  assert s["BasicBlock_5"]["BatchNorm_1"]["var"].shape == (21,)
  fresh = jax.random.normal(jax.random.key(7), (6, 16, 16, 3))
  np.testing.assert_allclose(wide.module.apply(wide.variables, fresh, train=False),
                             m.apply(v, fresh, train=False), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(wide.apply_fn(wide.variables, fresh),
                             m.apply(v, fresh, train=False), rtol=1e-5, atol=1e-5)


def test_new_entries_follow_the_rule():
  m, v, x = _resnet()
  wide = sl.widen_linen(m, v, {"BasicBlock_3/Conv_0": 40}, x, key=jax.random.key(3),
                        init="fan_in", train=False)
  old, new = v["params"]["BasicBlock_3"], wide.variables["params"]["BasicBlock_3"]
  k0, k1 = np.asarray(new["Conv_0"]["kernel"]), np.asarray(new["Conv_1"]["kernel"])
  np.testing.assert_array_equal(k0[..., :8], old["Conv_0"]["kernel"])  # old entries kept
  np.testing.assert_array_equal(k1[:, :, :8], old["Conv_1"]["kernel"])
  assert not np.any(k1[:, :, 8:])                       # outgoing: zero
  incoming = k0[..., 8:]                                # 3·3·8 = 72 inputs each
  assert np.all(incoming != 0)
  assert incoming.std() == pytest.approx(1 / np.sqrt(72), rel=0.1)  # LeCun normal
  assert np.abs(incoming).max() <= 2 / np.sqrt(72) / 0.8796 + 1e-6  # truncated at 2σ
  bn, stats = new["BatchNorm_0"], wide.variables["batch_stats"]["BasicBlock_3"]["BatchNorm_0"]
  np.testing.assert_array_equal(bn["scale"][8:], 1.0)
  np.testing.assert_array_equal(bn["bias"][8:], 0.0)
  np.testing.assert_array_equal(stats["mean"][8:], 0.0)
  np.testing.assert_array_equal(stats["var"][8:], 1.0)
  # init="module": the widened module's own initializers (He normal in CifarResNet)
  by_module = sl.widen_linen(m, v, {"BasicBlock_3/Conv_0": 40}, x, key=jax.random.key(3),
                             train=False)
  module_init = np.asarray(by_module.variables["params"]["BasicBlock_3"]["Conv_0"]["kernel"])
  ref = by_module.module.init(jax.random.key(3), x, train=False)
  np.testing.assert_array_equal(module_init[..., 8:],
                                ref["params"]["BasicBlock_3"]["Conv_0"]["kernel"][..., 8:])


def test_flatten_interleaves_the_new_rows():
  m = models.get_model("lenet5", 10)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  v = _randomize(m.init(jax.random.key(1), x))
  wide = sl.widen_linen(m, v, {"Conv_1": 2, "Dense_0": 3, "Dense_1": 1}, x,
                        key=jax.random.key(3))
  rows = np.asarray(wide.variables["params"]["Dense_0"]["kernel"])
  assert rows.shape == (5 * 5 * 18, 123)
  # row (h, w, c) of the flattened 5×5×16 input is row (h, w, c) of the 5×5×18 one
  old = np.asarray(v["params"]["Dense_0"]["kernel"]).reshape(5, 5, 16, 120)
  np.testing.assert_array_equal(rows.reshape(5, 5, 18, 123)[:, :, :16, :120], old)
  assert not rows.reshape(5, 5, 18, 123)[:, :, 16:, :120].any()
  fresh = jax.random.normal(jax.random.key(8), (3, 28, 28, 1))
  np.testing.assert_allclose(wide.module.apply(wide.variables, fresh), m.apply(v, fresh),
                             rtol=1e-5, atol=1e-5)


def test_vit_heads_with_gqa_and_mlp_neurons():
  m = models.ViT(num_classes=10, patch=4, d_model=16, depth=2, num_heads=4, head_dim=4,
                 mlp_dim=8, num_kv_heads=2)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  v = _randomize(m.init(jax.random.key(1), x))
  wide = sl.widen_linen(m, v, {"block_0/attn/key": 1, "block_1/mlp_in": 3}, x,
                        key=jax.random.key(3))
  attn = wide.variables["params"]["block_0"]["attn"]
  # one more key / value head brings its group of 2 query heads
  assert attn["key"]["kernel"].shape == (16, 3, 4) and attn["query"]["kernel"].shape == (16, 6, 4)
  assert attn["out"]["kernel"].shape == (6, 4, 16)
  assert wide.module.block_heads == (6, 4) and wide.module.block_mlp == (8, 11)
  fresh = jax.random.normal(jax.random.key(9), (2, 8, 8, 1))
  np.testing.assert_allclose(wide.module.apply(wide.variables, fresh), m.apply(v, fresh),
                             rtol=1e-5, atol=1e-5)


def test_nnx_gpt_heads_and_neurons():
  model = NnxGPT(vocab=32, context=8, d_model=16, depth=2, num_heads=4, head_dim=4,
                 mlp_dim=12, num_kv_heads=2, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 8), 0, 32)
  wide = sl.widen_nnx(model, {("blocks/1/attn/key/kernel", 1): 2,
                              "blocks/0/mlp_in/kernel": 4}, tokens, key=jax.random.key(2))
  new = wide.module
  assert new.blocks[1].attn.query.kernel.shape == (16, 8, 4)
  assert new.blocks[0].mlp_in.out_features == 16 and new.blocks[0].mlp_out.in_features == 16
  fresh = jax.random.randint(jax.random.key(5), (2, 8), 0, 32)
  np.testing.assert_allclose(new(fresh), model(fresh), rtol=1e-5, atol=1e-5)
  assert model.blocks[0].mlp_in.kernel.shape == (16, 12)  # the old model is untouched


def test_refusals_name_the_class():
  m = models.ViT(num_classes=10, patch=4, d_model=16, depth=1, num_heads=2, head_dim=4,
                 mlp_dim=8)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  v = m.init(jax.random.key(1), x)
  apply = lambda v, x: m.apply(v, x)  # noqa: E731
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="'head/kernel'.*model output"):
    sl.widen(apply, v, {"head/kernel": 2}, x, key=key)
  with pytest.raises(ValueError, match="reduced over .*ln1"):   # d_model: LayerNorm mixes it
    sl.widen(apply, v, {("embed/kernel", 3): 2}, x, key=key)
  with pytest.raises(ValueError, match="contracted between two activations"):
    sl.widen(apply, v, {("block_0/attn/query/kernel", 2): 1}, x, key=key)
  with pytest.raises(ValueError, match="names no channel class"):
    sl.widen(apply, v, {"nowhere": 1}, x, key=key)
  with pytest.raises(ValueError, match="2 output axes"):
    sl.widen(apply, v, {"block_0/attn/query/kernel": 1}, x, key=key)
  with pytest.raises(ValueError, match=r"extra\['block_0/mlp_in'\] must be a non-negative"):
    sl.widen(apply, v, {"block_0/mlp_in": -1}, x, key=key)
  with pytest.raises(ValueError, match="PRNG key"):
    sl.widen(apply, v, {"block_0/mlp_in": 1}, x)


# ---------------------------------------------------------------- optimizer state


def _loss(model, variables, x, y):
  def loss(params):
    logits = model.apply({**variables, "params": params}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jax.grad(loss)


def _steps(tx, grad, params, state, n):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad(params), state, params)
    return optax.apply_updates(params, updates), state
  for _ in range(n):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("kind", ["per_leaf", "channels", "injected_chain"])
def test_splitlbi_path_continues_on_the_old_entries(kind):
  m, v, x = _resnet()
  y = jnp.arange(4) % 10
  def make(variables, module):
    penalty = None
    if kind == "channels":   # the classes of the widened model are larger: rebuilt
      penalty = sl.channel_groups(lambda v, x: module.apply(v, x, train=False), variables, x,
                                  lam=0.05)
    if kind == "injected_chain":
      return optax.chain(optax.clip_by_global_norm(10.0), optax.inject_hyperparams(
          sl.splitlbi)(learning_rate=0.05, kappa=2.0, nu=1.0, lam=0.05, momentum=0.9,
                       record_path=True))
    return sl.splitlbi(0.05, kappa=2.0, nu=1.0, lam=0.05, momentum=0.9, record_path=True,
                       penalty=penalty)

  tx = make(v, m)
  params, state = _steps(tx, _loss(m, v, x, y), v["params"], tx.init(v["params"]), 3)
  grown = {**v, "params": params}
  wide = sl.widen_linen(m, grown, {"BasicBlock_0/Conv_1": 2, "BasicBlock_3/Conv_0": 3}, x,
                        key=jax.random.key(3), train=False)
  wide_tx = make(wide.variables, wide.module)
  wstate = sl.widen_state(wide, state, wide_tx.init(wide.variables["params"]))
  slbi = sl.find_state(wstate)
  for field, fill in (("v", 0), ("gamma", 0), ("momentum", 0), ("entry", -1)):
    new_filters = np.asarray(getattr(slbi, field)["BasicBlock_3"]["Conv_0"]["kernel"])[..., 8:]
    assert np.all(new_filters == fill), field       # zero, never entered
  old_next, old_state = _steps(tx, _loss(m, v, x, y), params, state, 1)
  wide_next, wide_state = _steps(wide_tx, _loss(wide.module, wide.variables, x, y),
                                 wide.variables["params"], wstate, 1)
  cut = lambda tree: sl.old_entries(wide, tree)  # noqa: E731
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               cut(wide_next), old_next)
  for field in ("v", "gamma", "momentum"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                 cut(getattr(sl.find_state(wide_state), field)),
                 getattr(sl.find_state(old_state), field))


def test_widen_state_adam_and_sharded_leaves():
  m, v, x = _resnet()
  tx = optax.adam(1e-3)
  state = tx.init(v["params"])
  state = jax.tree.map(lambda a: a + 1 if a.dtype == jnp.float32 else a, state)
  state = (state[0]._replace(count=jnp.asarray(5, jnp.int32)),) + tuple(state[1:])
  wide = sl.widen_linen(m, v, {"BasicBlock_3/Conv_0": 3}, x, key=jax.random.key(3), train=False)
  mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fresh = jax.device_put(tx.init(wide.variables["params"]), rep)
  out = sl.widen_state(wide, state, fresh)
  mu = np.asarray(out[0].mu["BasicBlock_3"]["Conv_0"]["kernel"])
  assert mu.shape == (3, 3, 8, 11) and np.all(mu[..., :8] == 1) and not mu[..., 8:].any()
  assert int(out[0].count) == 5     # not a parameter: the old value
  assert out[0].mu["Conv_0"]["kernel"].sharding == rep
  with pytest.raises(ValueError, match="same tree structure"):
    sl.widen_state(wide, state, optax.sgd(0.1, momentum=0.9).init(wide.variables["params"]))


def test_orbax_resume_across_a_growth_step(tmp_path):
  """Saved after widening, restored into a target of the widened shapes (what a
  resumed run rebuilds from its recorded widths), the run continues identically."""
  import orbax.checkpoint as ocp
  m, v, x = _resnet()
  y = jnp.arange(4) % 10
  tx = sl.splitlbi(0.05, kappa=2.0, nu=1.0, lam=0.05, momentum=0.9, record_path=True)
  params, state = _steps(tx, _loss(m, v, x, y), v["params"], tx.init(v["params"]), 2)
  wide = sl.widen_linen(m, {**v, "params": params}, {"BasicBlock_3/Conv_0": 3}, x,
                        key=jax.random.key(3), train=False)
  wstate = sl.widen_state(wide, state, tx.init(wide.variables["params"]))
  tree = {"params": wide.variables["params"], "opt_state": wstate}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "grown", tree)
  rebuilt = wide.module   # a resumed run rebuilds the module from its widths
  abstract = jax.eval_shape(lambda: {"params": rebuilt.init(jax.random.key(0), x,
                                                            train=False)["params"]})
  abstract["opt_state"] = jax.eval_shape(tx.init, abstract["params"])
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "grown", abstract)
  grad = _loss(wide.module, wide.variables, x, y)
  want, want_state = _steps(tx, grad, tree["params"], wstate, 1)
  got, got_state = _steps(tx, grad, restored["params"], restored["opt_state"], 1)
  jax.tree.map(np.testing.assert_array_equal, (got, sl.find_state(got_state).v),
               (want, sl.find_state(want_state).v))
