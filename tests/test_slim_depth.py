"""Zero-width layers (issue 18, "whole blocks (depth)"): masks that prune every head of a
transformer block's attention, every neuron of its MLP, or both, and every filter of a
conv layer. The slim model has zero-width layers there (a branch adds only what
survives of it, e.g. the output projection's bias), computes the masked dense model,
has the parameter count worked out by hand, and its architecture builds fresh
(zero-size kernels: no division by a zero fan-in / fan-out, no NaN)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_splitlbi as sl
from examples import models
from examples import transformers_nnx as tnnx
from test_slim import _masked, _vars, grouped_chain
from test_slim_models import (CASES, _count_by_hand, _get, _masked_apply, _masks,
                              _silence_padded, random_variables)
from test_transformers import D, HD, PATCH, _count, _gpt_by_hand, _random_nnx_gpt, _vit_by_hand

HEADS, MLP = 4, 5
# Every entry of these leaves is pruned: the q / k / v columns and biases and the
# output projection's rows (its bias stays), the MLP's input columns and bias and
# its output rows (its bias stays).
NO_HEADS = {"attn/query": ("kernel", "bias"), "attn/key": ("kernel", "bias"),
            "attn/value": ("kernel", "bias"), "attn/out": ("kernel",)}
NO_MLP = {"mlp_in": ("kernel", "bias"), "mlp_out": ("kernel",)}
PLAN = {0: NO_HEADS, 1: NO_MLP, 2: {**NO_HEADS, **NO_MLP}}   # block → pruned leaves


def _slim_blocks(kv):
  """(heads, kv heads, head dim, MLP) kept per block, for ``_block_by_hand``."""
  return [(0, 0, HD, MLP), (HEADS, kv or HEADS, HD, 0), (0, 0, HD, 0)]


def _prune_blocks(masks, params, block):
  """``masks`` with the PLAN leaves of each block (``block(tree, b)``) all False."""
  for b, layers in PLAN.items():
    for path, leaves in layers.items():
      node_m, node_p = block(masks, b), block(params, b)
      for part in path.split("/"):
        node_m, node_p = node_m[part], node_p[part]
      for leaf in leaves:
        node_m[leaf] = np.zeros(np.shape(node_p[leaf]), bool)
  return masks


def _linen_transformer(name, kv):
  """The model, an input drawer ``(rng, batch) -> x`` and its parameter count by hand."""
  kw = dict(d_model=D, depth=3, num_heads=HEADS, head_dim=HD, mlp_dim=MLP, num_kv_heads=kv)
  if name == "vit":
    return (models.ViT(num_classes=3, patch=PATCH, **kw),
            lambda rng, n: jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32),
            lambda blocks: _vit_by_hand(5, 3, D, PATCH, 1, blocks))
  return (models.GPT(vocab=11, context=6, **kw),
          lambda rng, n: jnp.asarray(rng.integers(0, 11, (n, 6)), jnp.int32),
          lambda blocks: _gpt_by_hand(11, 6, D, blocks))


def _assert_finite(tree):
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,kv", [("vit", None), ("vit", 2), ("gpt", None), ("gpt", 2)])
def test_linen_blocks_without_heads_or_mlp_neurons_slim_to_zero_width(name, kv):
  rng = np.random.default_rng(0)
  model, draw, by_hand = _linen_transformer(name, kv)
  x = draw(rng, 3)
  params = jax.tree.map(lambda a: np.asarray(rng.normal(0, 0.5, a.shape), np.float32),
                        jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"])
  masks = _prune_blocks(jax.tree.map(lambda _: None, params), params,
                        lambda t, b: t[f"block_{b}"])
  res = sl.slim_linen(model, {"params": params}, masks, x, count_flops=False)

  slim = res.module
  assert (slim.block_heads, slim.block_kv_heads, slim.block_mlp) == (
      (0, HEADS, 0), (0, kv or HEADS, 0), (MLP, 0, 0))
  p = res.variables["params"]
  for b in (0, 2):   # the branch adds its output projection's bias, nothing else
    assert p[f"block_{b}"]["attn"]["out"]["kernel"].size == 0
    np.testing.assert_array_equal(p[f"block_{b}"]["attn"]["out"]["bias"],
                                  params[f"block_{b}"]["attn"]["out"]["bias"])
  assert p["block_1"]["mlp_in"]["kernel"].shape == (D, 0)
  assert p["block_2"]["ln2"]["scale"].shape == (D,)   # the residual stream stays whole
  fresh = slim.init(jax.random.key(1), x)             # the slim architecture, built anew
  n = by_hand(_slim_blocks(kv))
  assert res.report["params"]["slim"] == n == _count(p) == _count(fresh["params"])
  _assert_finite(fresh)
  _assert_finite(slim.apply(fresh, x))
  x2 = draw(rng, 5)
  want = model.apply({"params": sl.apply_masks(params, masks)}, x2)
  np.testing.assert_allclose(slim.apply(res.variables, x2), want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kv", [None, 2])
def test_nnx_blocks_without_heads_or_mlp_neurons_slim_to_zero_width(kv):
  model = _random_nnx_gpt(4, vocab=11, context=6, d_model=D, depth=3, num_heads=HEADS,
                          head_dim=HD, mlp_dim=MLP, num_kv_heads=kv)
  params = nnx.state(model, nnx.Param)
  masks = _prune_blocks(jax.tree.map(lambda _: None, params), params,
                        lambda t, b: t["blocks"][b])
  dense = nnx.clone(model)
  nnx.update(dense, sl.apply_masks(params, masks))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 11, (3, 6)), jnp.int32)
  res = sl.slim_nnx(model, masks, tokens, count_flops=False)

  slim = res.module
  assert [blk.attn.query.kernel.shape[1] for blk in slim.blocks] == [0, HEADS, 0]
  assert [blk.attn.key.kernel.shape[1] for blk in slim.blocks] == [0, kv or HEADS, 0]
  assert [blk.mlp_in.out_features for blk in slim.blocks] == [MLP, 0, 0]
  fresh = tnnx.GPT(11, 6, D, 3, (0, HEADS, 0), HD, (MLP, 0, 0), (0, kv or HEADS, 0),
                   rngs=nnx.Rngs(1))
  n = _gpt_by_hand(11, 6, D, _slim_blocks(kv))
  assert res.report["params"]["slim"] == n == tnnx.count_params(slim) == tnnx.count_params(fresh)
  _assert_finite(nnx.state(fresh))
  _assert_finite(fresh(tokens))
  tokens2 = jnp.asarray(np.random.default_rng(6).integers(0, 11, (5, 6)), jnp.int32)
  want = dense(tokens2)
  np.testing.assert_allclose(slim(tokens2), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------------------ convs


@pytest.mark.parametrize("name,layer", [("digits_cnn", "Conv_1"),
                                        ("resnet20", "BasicBlock_4/Conv_0")])
def test_a_conv_without_filters_slims_to_zero_width(name, layer):
  """digits_cnn: Conv_1's constants ReLU(bias) reach the dense layer after the flatten
  (folded exactly), and Conv_0, which only Conv_1 read, is read by nobody: it goes too.
  resnet20 (BatchNorm): a block's inner conv goes, the block is its shortcut plus a
  constant (BN of the empty conv's zero output)."""
  kwargs, shape, arch = CASES[name]
  rng = np.random.default_rng(1)
  model = models.get_model(name, 10, **kwargs)
  x = jnp.asarray(rng.normal(size=(3, *shape)), jnp.float32)
  target = next(l for l in arch.layers if l.kernel == layer)
  assert [l for l in arch.layers if l.out == target.out] == [target]   # its only producer
  pruned = {l.kernel: np.full(arch.sizes[l.out], l is target)
            for l in arch.layers if l.out != "logits"}
  removed = {g: np.full(n, g == target.out) for g, n in arch.sizes.items()}
  if [l for l in arch.layers if l.inp == target.inp] == [target]:   # its only reader
    removed[target.inp][:] = True
  variables = _silence_padded(arch, random_variables(model, x, rng), removed, rng)
  masks = _masks(arch, variables["params"], pruned, rng)
  res = sl.slim_linen(model, variables, masks, x, count_flops=False, train=False)

  width = {g: n - int(removed[g].sum()) for g, n in arch.sizes.items()}
  assert width[target.out] == 0 and _get(res.variables["params"], layer)["kernel"].shape[-1] == 0
  fresh = res.module.init(jax.random.key(1), x, train=False)
  n = _count_by_hand(arch, width)
  assert res.report["params"]["slim"] == n == _count(res.variables["params"]) == _count(
      fresh["params"])
  _assert_finite(fresh)
  _assert_finite(res.module.apply(fresh, x, train=False))
  x2 = jnp.asarray(rng.normal(size=(5, *shape)), jnp.float32)
  want = np.asarray(_masked_apply(model, variables, masks, x2))
  got = res.module.apply(res.variables, x2, train=False)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
  assert all(f["exact"] for f in res.report["folds"])


@pytest.mark.parametrize("groups,shapes", [
    (6, dict(a=(3, 3, 2, 6), g=(3, 3, 1, 6), c=(1, 1, 6, 4))),    # depthwise
    (2, dict(a=(1, 1, 3, 8), g=(1, 1, 4, 8), c=(1, 1, 8, 2)))])   # 2 groups of 4
def test_a_grouped_conv_whose_inputs_all_go_keeps_its_groups(groups, shapes):
  """Every filter of ``a`` is pruned (ReLU(-1) = 0): the grouped conv ``g`` reads zero
  channels in each of its groups and its outputs are ReLU(bias), folded into ``c``."""
  rng = np.random.default_rng(2)
  v, apply = _vars(rng, **shapes), grouped_chain(groups)
  v["a"]["bias"][:] = -1.0
  masks = {"a": {"kernel": np.zeros(shapes["a"], bool), "bias": None},
           "g": {"kernel": None, "bias": None}, "c": {"kernel": None, "bias": None}}
  x = rng.normal(size=(2, 5, 5, shapes["a"][2])).astype(np.float32)
  res = sl.slim(apply, v, masks, x)
  assert res.variables["a"]["kernel"].shape == shapes["a"][:-1] + (0,)
  assert res.variables["g"]["kernel"].shape == shapes["g"][:2] + (0, shapes["g"][3])
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  assert 0 < res.report["flops"]["slim"] < res.report["flops"]["dense"]


# ------------------------------------------------------------- what zero width needs


class _DefaultInit(nn.Module):
  """Two VALID convs and a dense layer with Flax's default (LeCun) initializers."""

  features: tuple = (4, 6)

  @nn.compact
  def __call__(self, x):
    for f in self.features:
      x = nn.relu(nn.Conv(f, (3, 3), padding="VALID")(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))

  def resized(self, shapes):
    return self.clone(features=tuple(int(shapes[f"Conv_{i}"]["kernel"][-1]) for i in range(2)))


def test_slim_linen_names_the_zero_width_variables_a_default_initializer_refuses():
  """Variance scaling divides by the fan-in / fan-out: a module whose layers use it
  cannot be rebuilt at width 0 (the error names the variables: Conv_1, and Conv_0, which
  only Conv_1 read); ``slim``'s replay runs."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 1)), jnp.float32)
  model = _DefaultInit()
  params = model.init(jax.random.key(0), x)["params"]
  masks = jax.tree.map(lambda _: None, params)
  masks["Conv_1"]["kernel"] = np.zeros((3, 3, 4, 6), bool)
  with pytest.raises(ValueError, match=r"_DefaultInit.resized\(...\).init fails .* zero-width "
                     r"variables \['Conv_0/bias', 'Conv_0/kernel', 'Conv_1/bias', "
                     r"'Conv_1/kernel', 'Dense_0/kernel'\]"):
    sl.slim_linen(model, {"params": params}, masks, x, count_flops=False)
  res = sl.slim(model.apply, {"params": params}, masks, x, count_flops=False)
  assert res.variables["params"]["Dense_0"]["kernel"].shape == (0, 3)
  np.testing.assert_allclose(res.apply_fn(res.variables, x),
                             model.apply({"params": sl.apply_masks(params, masks)}, x),
                             rtol=1e-5, atol=1e-5)


def test_the_residual_stream_and_the_output_keep_their_width():
  """Zero width is undefined where a dim is reduced over (the LayerNorms of the residual
  stream) or is the model's output: masks pruning all of it remove nothing there."""
  rng = np.random.default_rng(4)
  model, draw, _ = _linen_transformer("gpt", 2)
  x = draw(rng, 3)
  params = model.init(jax.random.key(0), x)["params"]
  masks = jax.tree.map(lambda _: None, params)
  masks["block_0"]["mlp_out"]["kernel"] = np.zeros((MLP, D), bool)   # its output columns
  masks["block_0"]["mlp_out"]["bias"] = np.zeros((D,), bool)
  res = sl.slim_linen(model, {"params": params}, masks, x, count_flops=False)
  layer = res.report["layers"]["params/block_0/mlp_out/kernel"]
  assert layer["removed"] == 0 and res.variables["params"]["block_0"]["ln2"]["scale"].shape == (D,)
  assert any("reduced over" in why or "output" in why for why in layer["kept_because"]), layer
  np.testing.assert_allclose(res.apply_fn(res.variables, x),
                             model.apply({"params": sl.apply_masks(params, masks)}, x),
                             rtol=1e-4, atol=1e-5)
