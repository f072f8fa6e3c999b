"""Slimming an attention block with head groups, an NNX model, masks from a real
SplitLBI run; slim models train, round-trip through orbax and slim again."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optax_splitlbi as sl
from examples import models


def _masked_params(params, masks):
  return jax.tree.map(lambda p, m: p if m is None else p * m, params, masks,
                      is_leaf=lambda m: m is None)


def _close(a, b, rtol=2e-4):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# ------------------------------------------------------------------------ attention


class AttentionBlock(nn.Module):
  """Self-attention with head groups + LayerNorm + MLP, mean-pooled to classes."""

  num_heads: int = 4
  head_dim: int = 3
  hidden: int = 10

  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(self.num_heads, qkv_features=self.num_heads *
                                        self.head_dim, name="attn")(x)
    x = nn.LayerNorm()(x + h)
    y = nn.relu(nn.Dense(self.hidden, name="Dense_0")(x))
    x = x + nn.Dense(x.shape[-1], name="Dense_1")(y)
    return nn.Dense(3, name="Dense_2")(x.mean(1))

  def resized(self, shapes):
    return self.clone(num_heads=shapes["attn"]["query"]["kernel"][1],
                      hidden=shapes["Dense_0"]["kernel"][1])


def _random(tree, rng):
  return jax.tree.map(lambda a: np.asarray(rng.normal(0, 0.5, a.shape), np.float32), tree)


def test_attention_heads_are_removed_from_qkv_and_the_output_projection():
  rng = np.random.default_rng(0)
  model, d = AttentionBlock(), 8
  x = jnp.asarray(rng.normal(size=(2, 5, d)), jnp.float32)
  params = _random(jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"], rng)
  # Head groups as the toolkit lays them out: group_support of attention_heads().
  state = sl.splitlbi(0.1, penalty=lambda p, w: sl.attention_heads()
                      if w.ndim == 3 and "out" not in str(p) else None).init(params)
  layout = sl.group_support(state)["attn"]["query"]["kernel"].shape
  assert layout == (1, 4, 1)
  heads = lambda *pruned: np.isin(np.arange(4), pruned, invert=True).reshape(layout)  # noqa
  masks = jax.tree.map(lambda _: None, params)
  masks["attn"]["query"]["kernel"] = heads(1, 2, 3)       # head 2 only in q: kept
  masks["attn"]["key"]["kernel"] = heads(1, 3)
  masks["attn"]["value"]["kernel"] = heads(3, 1)
  masks["Dense_0"]["kernel"] = np.isin(np.arange(10), [2, 7], invert=True)[None, :]
  res = sl.slim_linen(model, {"params": params}, masks, x)

  p = res.variables["params"]["attn"]
  assert p["query"]["kernel"].shape == p["value"]["kernel"].shape == (d, 2, 3)
  assert p["query"]["bias"].shape == (2, 3) and p["out"]["kernel"].shape == (2, 3, d)
  np.testing.assert_array_equal(p["out"]["kernel"], params["attn"]["out"]["kernel"][[0, 2]])
  assert res.module.num_heads == 2 and res.module.hidden == 8
  # By hand: q, k, v (+ biases), out (+ bias), LayerNorm, two dense layers, classifier.
  n = 3 * (d * 2 * 3 + 2 * 3) + (2 * 3 * d + d) + 2 * d + (d * 8 + 8) + (8 * d + d) + (d * 3 + 3)
  assert res.report["params"]["slim"] == n
  x2 = jnp.asarray(rng.normal(size=(6, 5, d)), jnp.float32)
  want = model.apply({"params": _masked_params(params, masks)}, x2)
  _close(res.module.apply(res.variables, x2), want)
  # The removed heads' value biases reach the output projection: folded into its bias.
  assert any(f["into"] == "params/attn/out/bias" and f["exact"] for f in res.report["folds"])
  why = res.report["layers"]["params/attn/query/kernel[axis 1]"]["kept_because"]
  assert any("attn/key/kernel" in w or "attn/value/kernel" in w for w in why)


# ------------------------------------------------------------------------------ NNX


class NNXNet(nnx.Module):
  """conv-BN-ReLU, a residual 1×1 conv-BN, global mean, two linear layers."""

  def __init__(self, rngs, c=6, h=5):
    self.conv1 = nnx.Conv(3, c, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(c, rngs=rngs)
    self.conv2 = nnx.Conv(c, c, (1, 1), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c, rngs=rngs)
    self.fc1 = nnx.Linear(c, h, rngs=rngs)
    self.fc2 = nnx.Linear(h, 3, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(y + self.bn2(self.conv2(y)))   # conv1 and conv2 share their channels
    return self.fc2(nnx.relu(self.fc1(y.mean((1, 2)))))


def _nnx_model(rng):
  model = NNXNet(nnx.Rngs(0))
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape)
                                                       if a.ndim == 1 else a, jnp.float32), state))
  for bn in (model.bn1, model.bn2):  # random statistics and shifts, not the init values
    bn.mean.set_value(jnp.asarray(rng.normal(0, 0.5, bn.mean.shape), jnp.float32))
    bn.bias.set_value(jnp.asarray(rng.normal(0, 0.5, bn.bias.shape), jnp.float32))
  model.eval()
  return model


def _nnx_masks(model, conv1, conv2, fc1):
  masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  keep = lambda n, pruned, shape: np.broadcast_to(  # noqa: E731
      np.isin(np.arange(n), pruned, invert=True), shape)
  masks["conv1"]["kernel"] = keep(model.conv1.out_features, conv1, model.conv1.kernel.shape)
  masks["conv2"]["kernel"] = keep(model.conv2.out_features, conv2, model.conv2.kernel.shape)
  masks["fc1"]["kernel"] = keep(model.fc1.out_features, fc1, model.fc1.kernel.shape)
  return masks


def _nnx_masked_output(model, masks, x):
  dense = nnx.clone(model)
  for name in ("conv1", "conv2", "fc1"):
    layer = getattr(dense, name)
    layer.kernel.set_value(layer.kernel.get_value() * masks[name]["kernel"])
  return dense(x)


def test_nnx_model_slims_to_a_new_module_that_trains_checkpoints_and_slims_again(tmp_path):
  rng = np.random.default_rng(1)
  model = _nnx_model(rng)
  masks = _nnx_masks(model, conv1=[1, 2, 4], conv2=[1, 2, 5], fc1=[0, 3])
  x = jnp.asarray(rng.normal(size=(3, 6, 6, 3)), jnp.float32)
  res = sl.slim_nnx(model, masks, x)
  slim = res.module
  assert slim.conv1.kernel.shape == (3, 3, 3, 4) and slim.conv2.kernel.shape == (1, 1, 4, 4)
  assert (slim.conv1.out_features, slim.conv2.in_features, slim.bn2.num_features) == (4, 4, 4)
  assert (slim.fc1.in_features, slim.fc1.out_features, slim.fc2.in_features) == (4, 3, 3)
  assert slim.bn1.mean.shape == slim.bn1.var.shape == (4,)
  assert model.conv1.kernel.shape == (3, 3, 3, 6)           # the input model is unchanged
  # conv 27·4 + 4, BN 2·4, conv 16, BN 2·4, fc1 4·3 + 3, fc2 3·3 + 3
  n = (27 * 4 + 4) + 8 + 16 + 8 + (12 + 3) + (9 + 3)
  assert sum(a.size for a in jax.tree.leaves(nnx.state(slim, nnx.Param))) == n
  assert res.report["params"]["slim"] == n
  x2 = jnp.asarray(rng.normal(size=(5, 6, 6, 3)), jnp.float32)
  _close(slim(x2), _nnx_masked_output(model, masks, x2))
  rep = res.report["layers"]["params/conv2/kernel/value"]
  assert (rep["removed"], rep["kept_pruned"]) == (2, 1)

  # Trains: one SGD step lowers the loss on a batch.
  y = jnp.asarray([0, 1, 2, 0, 1])
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x2), y).mean()  # noqa
  opt = nnx.Optimizer(slim, optax.sgd(0.01), wrt=nnx.Param)
  before = loss(slim)
  opt.update(slim, nnx.grad(loss)(slim))
  assert loss(slim) < before
  # Orbax round trip into a module of the slim architecture.
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "slim", nnx.state(slim))
  ckpt.wait_until_finished()
  target = nnx.clone(slim)
  nnx.update(target, jax.tree.map(jnp.zeros_like, nnx.state(target)))
  nnx.update(target, ckpt.restore(tmp_path / "slim", nnx.state(target)))
  _close(target(x2), slim(x2), rtol=1e-6)
  # Slims again: one more shared channel goes.
  again = sl.slim_nnx(slim, _nnx_masks(slim, conv1=[0, 2], conv2=[0], fc1=[1]), x)
  assert again.module.conv2.kernel.shape == (1, 1, 3, 3) and again.module.fc1.out_features == 2


# ----------------------------------------------------------- masks of a SplitLBI run


@pytest.fixture(scope="module")
def digits_run():
  rng = np.random.default_rng(2)
  model = models.get_model("digits_cnn", 10)
  x = jnp.asarray(rng.normal(size=(64, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 64))
  params = model.init(jax.random.key(0, impl="rbg"), x)["params"]
  def penalty(path, w):  # filters of Conv_0 enter first; a light lasso on dense kernels
    if w.ndim == 4:
      return sl.conv_filters(0.4 if "Conv_0" in str(path) else 0.8)
    return sl.Lasso(0.02) if w.ndim == 2 else None

  tx = sl.splitlbi(0.1, nu=1.0, penalty=penalty, record_path=True)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      model.apply({"params": p}, x), y).mean()

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(25):
    params, state = step(params, state)
  return model, params, state, x


def _widths_by_hand(masks):
  """Kept channels of DigitsCNN from its masks (filters, and read by the next layer)."""
  m = jax.tree.map(np.asarray, masks)
  conv0 = m["Conv_0"]["kernel"].any((0, 1, 2))
  rows = m["Dense_0"]["kernel"].reshape(4, 4, 32, 64).any((0, 1, 3))   # flatten: (h, w, c)
  conv1 = m["Conv_1"]["kernel"].any((0, 1, 2)) & rows
  hidden = m["Dense_0"]["kernel"].any(0) & m["Dense_1"]["kernel"].any(1)
  return int(conv0.sum()), int(conv1.sum()), int(hidden.sum())


def test_masks_from_support_group_support_entered_by_and_prune_to_sparsity(digits_run):
  model, params, state, x = digits_run
  variables = {"params": params}
  full = sl.slim_linen(model, variables, sl.support(state), x, count_flops=False)
  group = sl.slim_linen(model, variables, sl.group_support(state), x, count_flops=False)
  for a, b in zip(jax.tree.leaves(full.variables), jax.tree.leaves(group.variables)):
    np.testing.assert_array_equal(a, b)   # the two layouts give the same network
  for masks in (sl.support(state), sl.entered_by(state, 20),
                sl.prune_to_sparsity(params, state, 0.5, scope="layer")):
    res = sl.slim_linen(model, variables, masks, x, count_flops=False)
    c0, c1, h = _widths_by_hand(masks)
    assert res.module.features == (c0, c1) and res.module.hidden == (h,)
    assert c0 < 16 or c1 < 32 or h < 64
    keep = sl.slim_linen(model, variables, masks, x, inexact="keep", count_flops=False)
    want = model.apply({"params": _masked_params(params, masks)}, x)
    _close(keep.module.apply(keep.variables, x), want)


def test_linen_slim_model_trains_checkpoints_and_slims_again(digits_run, tmp_path):
  model, params, state, x = digits_run
  masks = sl.prune_to_sparsity(params, state, 0.5, scope="layer")
  res = sl.slim_linen(model, {"params": params}, masks, x, count_flops=False)
  slim, variables = res.module, res.variables
  y = jnp.arange(64) % 10
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      slim.apply({"params": p}, x), y).mean()
  grads = jax.grad(loss)(variables["params"])
  stepped = optax.apply_updates(variables["params"], jax.tree.map(lambda g: -0.05 * g, grads))
  assert loss(stepped) < loss(variables["params"])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "v", variables)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "v", jax.eval_shape(lambda: variables))
  _close(slim.apply(restored, x), slim.apply(variables, x), rtol=1e-6)
  # Slim again with a mask that prunes one more filter of Conv_0.
  m2 = jax.tree.map(lambda _: None, variables["params"])
  m2["Conv_0"]["kernel"] = np.broadcast_to(np.arange(slim.features[0]) != 0,
                                           variables["params"]["Conv_0"]["kernel"].shape)
  again = sl.slim_linen(slim, variables, m2, x, count_flops=False)
  assert again.module.features == (slim.features[0] - 1, slim.features[1])
