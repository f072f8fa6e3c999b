"""Transformers of the examples (Linen ViT / GPT, NNX GPT): shapes and parameter
counts by hand, causal masking, grouped-query attention, and slimming heads, key /
value groups and MLP neurons to smaller modules that compute the masked model."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_splitlbi as sl
from examples import models
from examples import transformers_nnx as tnnx

D, HD, PATCH = 8, 2, 4   # d_model, head_dim, patch of the small test models


def _count(tree):
  return sum(int(np.size(a)) for a in jax.tree.leaves(tree))


def _block_by_hand(d, heads, kv, head_dim, mlp):
  """LayerNorms, q / k / v (+ biases), output projection (+ bias), MLP (+ biases)."""
  return (2 * 2 * d + (d * heads * head_dim + heads * head_dim)
          + 2 * (d * kv * head_dim + kv * head_dim) + (heads * head_dim * d + d)
          + (d * mlp + mlp) + (mlp * d + d))


def _vit_by_hand(tokens, classes, d, patch, channels, blocks):
  """Patch conv (+ bias), class token, positions, blocks, final LayerNorm, head."""
  return ((patch * patch * channels * d + d) + d + tokens * d
          + sum(_block_by_hand(d, *b) for b in blocks) + 2 * d + (d * classes + classes))


def _gpt_by_hand(vocab, context, d, blocks, tied=True):
  """Embedding, positions, blocks, final LayerNorm, (untied) head without bias."""
  return (vocab * d + context * d + sum(_block_by_hand(d, *b) for b in blocks) + 2 * d
          + (0 if tied else d * vocab))


# ------------------------------------------------------------------------ shapes


def test_registered_vit_shapes_and_parameter_count_by_hand():
  model = models.get_model("vit", 10)
  x = jnp.zeros((2, 28, 28, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  p = variables["params"]
  assert p["embed"]["kernel"].shape == (4, 4, 1, 64) and p["pos"].shape == (50, 64)
  assert p["block_3"]["attn"]["query"]["kernel"].shape == (64, 4, 16)
  assert p["block_3"]["attn"]["out"]["kernel"].shape == (4, 16, 64)
  # 7×7 patches + the class token; 4 blocks of 4 heads of 16, MLP 128.
  assert _count(p) == _vit_by_hand(50, 10, 64, 4, 1, [(4, 4, 16, 128)] * 4)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)


@pytest.mark.parametrize("init_std", [None, 0.02])
def test_init_std_sets_the_block_kernels_only(init_std):
  """LeCun normal (std 1/√fan-in) by default; N(0, 0.02²) for every block kernel
  with init_std=0.02, whatever its fan-in; embeddings and biases as before."""
  model = models.GPT(context=16, d_model=64, depth=2, mlp_dim=256, init_std=init_std)
  p = jax.jit(lambda: model.init(jax.random.key(3), jnp.zeros((1, 16), jnp.int32)))()["params"]
  fan_in = {"attn/query": 64, "attn/key": 64, "attn/value": 64, "attn/out": 64,
            "mlp_in": 64, "mlp_out": 256}
  for b in ("block_0", "block_1"):
    for name, fan in fan_in.items():
      layer = functools.reduce(lambda t, k: t[k], name.split("/"), p[b])
      want = init_std or 1 / np.sqrt(fan)
      assert abs(float(np.std(layer["kernel"])) / want - 1) < 0.05, (b, name)
      assert not np.any(layer["bias"])
  lecun = models.GPT(context=16, d_model=64, depth=2, mlp_dim=256)
  q = jax.jit(lambda: lecun.init(jax.random.key(3), jnp.zeros((1, 16), jnp.int32)))()["params"]
  for name in ("embed", "pos", "ln_f"):
    chex.assert_trees_all_equal(p[name], q[name])


def test_gpt_parameter_counts_by_hand_linen_and_nnx():
  blocks = [(6, 2, HD, 5), (4, 1, HD, 3)]
  nnx_gpt = tnnx.GPT(11, 6, D, 2, (6, 4), HD, (5, 3), (2, 1), tied=False, rngs=nnx.Rngs(0))
  assert tnnx.count_params(nnx_gpt) == _gpt_by_hand(11, 6, D, blocks, tied=False)
  assert nnx_gpt.blocks[1].attn.key.kernel.shape == (D, 1, HD)
  linen = models.GPT(vocab=11, context=6, d_model=D, depth=2, num_heads=6, head_dim=HD,
                     mlp_dim=5, num_kv_heads=2)
  tokens = jnp.zeros((2, 5), jnp.int32)
  variables = jax.eval_shape(lambda: linen.init(jax.random.key(0), tokens))
  assert _count(variables) == _gpt_by_hand(11, 6, D, [(6, 2, HD, 5)] * 2)
  assert nnx_gpt(tokens).shape == (2, 5, 11)


# -------------------------------------------------------------- causal, GQA


def _random_nnx_gpt(seed, **kw):
  model = tnnx.GPT(**kw, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype),
                                 nnx.state(model, nnx.Param)))
  return model


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_a_token_changes_no_logit_before_it(framework):
  kw = dict(vocab=11, context=7, d_model=D, depth=2, num_heads=4, head_dim=HD, mlp_dim=5,
            num_kv_heads=2)
  if framework == "nnx":
    run = _random_nnx_gpt(0, **kw)
  else:
    model = models.GPT(**kw)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 7), jnp.int32))
    run = lambda t: model.apply(variables, t)  # noqa: E731
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 7)))
  base = np.asarray(run(tokens))
  for t in (0, 3, 6):
    logits = np.asarray(run(tokens.at[:, t].set((tokens[:, t] + 1) % 11)))
    np.testing.assert_array_equal(logits[:, :t], base[:, :t])
    assert np.abs(logits[:, t:] - base[:, t:]).max() > 1e-4, t


def _naive_attention(q, k, v, causal):
  """Per query head h: softmax(q_h k_{h // G}ᵀ / √D) v_{h // G}, in float64 loops."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros((b, t, h, v.shape[-1]))
  for i in range(b):
    for j in range(h):
      s = q[i, :, j] @ k[i, :, j // group].T / np.sqrt(d)
      if causal:
        s = np.where(np.tril(np.ones_like(s, bool)), s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      out[i, :, j] = (w / w.sum(-1, keepdims=True)) @ v[i, :, j // group]
  return out


def test_grouped_query_attention_shares_key_value_heads():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  gqa = models.GQAttention(num_heads=6, head_dim=HD, num_kv_heads=2, causal=True)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32),
                        gqa.init(jax.random.key(0), x)["params"])
  # The same layer with 6 key / value heads, kv head g copied to its 3 query heads.
  mha = models.GQAttention(num_heads=6, head_dim=HD, causal=True)
  full = dict(params, **{n: jax.tree.map(lambda a: jnp.repeat(a, 3, axis=a.ndim - 2),
                                         params[n]) for n in ("key", "value")})
  want = mha.apply({"params": full}, x)
  np.testing.assert_allclose(gqa.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)
  q, k, v = (jnp.einsum("btd,dhe->bthe", x, params[n]["kernel"]) + params[n]["bias"]
             for n in ("query", "key", "value"))
  np.testing.assert_allclose(models.attend(q, k, v, causal=True),
                             _naive_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ slimming
# 6 query heads in 2 key / value groups of 3 (head h = 3·g + i uses kv head g),
# MLP of 5. Block 0: kv group 1 goes (its key / value heads and query heads 3-5
# pruned), query index 2 of every group goes (heads 2 and 5: output-projection
# rows pruned), head 0's query columns alone are pruned (kept: a pruned query still
# averages its group's values), MLP neurons 0 (by its output row) and 3 go.
# Block 1: one head's output rows (head 1: its partner head 4 stays, so both stay),
# head 4's query columns (kept), MLP neurons 1 and 2 go.
HEADS, KV, MLP = 6, 2, 5
PRUNED = {
    0: {"attn/query": (1, [0, 3, 4, 5]), "attn/key": (1, [1]), "attn/value": (1, [1]),
        "attn/out": (0, [2, 5]), "mlp_out": (0, [0]), "mlp_in": (1, [3])},
    1: {"attn/out": (0, [1]), "attn/query": (1, [4]), "mlp_in": (1, [1, 2])},
}
SLIM_BLOCKS = [(2, 1, HD, 3), (6, 2, HD, 3)]   # (heads, kv heads, head dim, MLP) kept
KEPT_HEADS_0 = [0, 1]


def _mask(shape, axis, pruned):
  keep = np.isin(np.arange(shape[axis]), pruned, invert=True)
  return np.broadcast_to(np.expand_dims(keep, [a for a in range(len(shape)) if a != axis]),
                         shape)


def _block_masks(block_params, spec, get):
  """{layer: kernel mask} of one block; ``get(block, "attn/query")`` is the layer."""
  return {name: _mask(np.shape(get(block_params, name)), axis, pruned)
          for name, (axis, pruned) in spec.items()}


def _linen_kernel(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree["kernel"]


def test_slim_vit_with_gqa_to_a_smaller_linen_vit():
  rng = np.random.default_rng(3)
  model = models.ViT(num_classes=3, patch=PATCH, d_model=D, depth=2, num_heads=HEADS,
                     head_dim=HD, mlp_dim=MLP, num_kv_heads=KV)
  x = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
  params = jax.tree.map(lambda a: np.asarray(rng.normal(0, 0.5, a.shape), np.float32),
                        jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"])
  masks = jax.tree.map(lambda _: None, params)
  masked = jax.tree.map(np.copy, params)
  for b, spec in PRUNED.items():
    for name, m in _block_masks(params[f"block_{b}"], spec, _linen_kernel).items():
      node_m, node_p = masks[f"block_{b}"], masked[f"block_{b}"]
      for part in name.split("/"):
        node_m, node_p = node_m[part], node_p[part]
      node_m["kernel"] = m
      node_p["kernel"] = node_p["kernel"] * m
  res = sl.slim_linen(model, {"params": params}, masks, x, count_flops=False)

  slim = res.module
  assert (slim.block_heads, slim.block_kv_heads, slim.block_mlp) == ((2, 6), (1, 2), (3, 3))
  attn = res.variables["params"]["block_0"]["attn"]
  assert attn["query"]["kernel"].shape == (D, 2, HD) and attn["key"]["kernel"].shape == (D, 1, HD)
  np.testing.assert_array_equal(attn["out"]["kernel"],
                                params["block_0"]["attn"]["out"]["kernel"][KEPT_HEADS_0])
  n = _vit_by_hand(5, 3, D, PATCH, 1, SLIM_BLOCKS)
  assert res.report["params"]["slim"] == n == _count(
      jax.eval_shape(lambda: slim.init(jax.random.key(0), x))["params"])
  x2 = jnp.asarray(rng.normal(size=(5, 8, 8, 1)), jnp.float32)
  want = model.apply({"params": masked}, x2)
  np.testing.assert_allclose(slim.apply(res.variables, x2), want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())
  assert all(f["exact"] for f in res.report["folds"])


def _nnx_kernel(block, name):
  layer = block
  for part in name.split("/"):
    layer = getattr(layer, part)
  return layer.kernel


def test_slim_gpt_with_gqa_to_a_smaller_nnx_gpt():
  model = _random_nnx_gpt(4, vocab=11, context=6, d_model=D, depth=2, num_heads=HEADS,
                          head_dim=HD, mlp_dim=MLP, num_kv_heads=KV)
  masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  dense = nnx.clone(model)
  for b, spec in PRUNED.items():
    for name, m in _block_masks(model.blocks[b], spec, _nnx_kernel).items():
      node = masks["blocks"][b]
      for part in name.split("/"):
        node = node[part]
      node["kernel"] = m
      kernel = _nnx_kernel(dense.blocks[b], name)
      kernel.set_value(kernel.get_value() * m)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 11, (3, 6)))
  res = sl.slim_nnx(model, masks, tokens, count_flops=False)

  slim = res.module
  attn = slim.blocks[0].attn
  assert attn.query.kernel.shape == (D, 2, HD) and attn.key.kernel.shape == (D, 1, HD)
  assert attn.out.in_features == (2, HD) and slim.blocks[0].mlp_in.out_features == 3
  assert slim.blocks[1].attn.value.kernel.shape == (D, 2, HD)
  np.testing.assert_array_equal(attn.out.kernel.get_value(),
                                np.asarray(model.blocks[0].attn.out.kernel.get_value())[KEPT_HEADS_0])
  n = _gpt_by_hand(11, 6, D, SLIM_BLOCKS)
  assert res.report["params"]["slim"] == n == tnnx.count_params(slim)
  assert model.blocks[0].attn.query.kernel.shape == (D, HEADS, HD)   # input unchanged
  tokens2 = jnp.asarray(np.random.default_rng(6).integers(0, 11, (5, 6)))
  want = dense(tokens2)
  np.testing.assert_allclose(slim(tokens2), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------ channel groups


def _classes(num_kv_heads):
  model = models.ViT(num_classes=3, patch=PATCH, d_model=D, depth=2, num_heads=4, head_dim=HD,
                     mlp_dim=MLP, num_kv_heads=num_kv_heads)
  x = jnp.zeros((2, 8, 8, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  groups = sl.channel_groups(lambda v, x: model.apply(v, x), variables, x)
  for c in groups.classes:
    print(c.name, c.size, c.members)
  return [(c.name, c.size, set(c.members)) for c in groups.classes]


def _members(block, layers, axis, bias_axis):
  return ({(f"{block}/{l}/kernel", axis) for l in layers}
          | {(f"{block}/{l}/bias", bias_axis) for l in layers})


def test_channel_groups_of_a_vit_are_heads_and_mlp_neurons_per_block():
  want = []
  for b in ("block_0", "block_1"):
    want += [(f"{b}/attn/key", 4, _members(b, ("attn/query", "attn/key", "attn/value"), 1, 0)),
             (f"{b}/mlp_in", MLP, _members(b, ("mlp_in",), 1, 0))]
  assert _classes(None) == want   # the residual stream (LayerNorm) and head dims are locked
  # GQA: one class per key / value head (2 groups of 2 query heads). The query kernel's
  # heads axis is the product (kv head, query in group), which a GroupClass member (one
  # axis of a leaf) cannot express: it stays with the default penalty.
  want = []
  for b in ("block_0", "block_1"):
    want += [(f"{b}/attn/key", 2, _members(b, ("attn/key", "attn/value"), 1, 0)),
             (f"{b}/mlp_in", MLP, _members(b, ("mlp_in",), 1, 0))]
  assert _classes(2) == want
