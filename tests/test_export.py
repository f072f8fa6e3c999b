"""Shipping a slim transformer (examples/export.py, issue 18): saved as orbax arrays plus
its architecture, loaded again (in a fresh Python process for the GPTs) and run. The
slim head counts, MLP widths and parameter counts are checked against numbers worked
out by hand from the masks; the logits against the in-process slim model's."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_splitlbi as sl
from examples import export, models
from examples import transformers_nnx as tnnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
D, HD, HEADS, KV, MLP = 8, 2, 4, 2, 5   # query head h = 2·g + i uses key / value head g
GPT_KW = dict(vocab=11, context=6, d_model=D, depth=2, num_heads=HEADS, head_dim=HD,
              mlp_dim=MLP, num_kv_heads=KV)
TOKENS = np.array([[0, 3, 7, 10, 2, 5], [9, 9, 1, 4, 6, 8]], np.int32)

# Dense GPT by hand (d 8, 4 heads of 2, 2 kv heads, MLP 5): per block LayerNorms 2·2·8,
# query 8·4·2 + 8, key and value 2·(8·2·2 + 4), out 4·2·8 + 8, mlp_in 8·5 + 5,
# mlp_out 5·8 + 8 = 32 + 72 + 72 + 72 + 45 + 48 = 341; embedding 11·8, positions 6·8,
# final LayerNorm 2·8: 2·341 + 88 + 48 + 16 = 834 (tied), + 8·11 head = 922 (untied).
# Removing 2 query heads of a block: query 8·2·2 + 2·2 and out rows 2·2·8 = 68;
# removing 2 MLP neurons: mlp_in 8·2 + 2 and mlp_out rows 2·8 = 34.
DENSE_GPT, DENSE_GPT_UNTIED, TWO_HEADS, TWO_NEURONS = 834, 922, 68, 34


def _count(tree):
  return sum(int(np.size(a)) for a in jax.tree.leaves(tree))


def _mask(shape, axis, pruned):
  keep = np.isin(np.arange(shape[axis]), pruned, invert=True)
  return np.broadcast_to(np.expand_dims(keep, [a for a in range(len(shape)) if a != axis]),
                         shape)


def _random_linen(model, x, seed):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  return jax.tree.map(lambda a: np.asarray(rng.normal(0, 0.5, a.shape), np.float32), shapes)


def _linen_masks(params, spec):
  """``spec``: {(block, "attn/out"): (axis, pruned indices)} on the kernels."""
  masks = jax.tree.map(lambda _: None, params)
  for (block, name), (axis, pruned) in spec.items():
    node, kernel = masks[block], params[block]
    for part in name.split("/"):
      node, kernel = node[part], kernel[part]
    node["kernel"] = _mask(kernel["kernel"].shape, axis, pruned)
  return masks


def _masked(params, masks):
  return jax.tree.map(lambda p, m: p if m is None else p * m, params, masks,
                      is_leaf=lambda m: m is None)


def _run_fresh(code, directory):
  """Runs ``code`` in a new Python process with ``sys.argv[1] = directory``."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


LOAD_LINEN = """
import json, pathlib, sys
import jax, numpy as np
from examples import export
out = pathlib.Path(sys.argv[1])
module, variables = export.load(out / "model")
np.save(out / "logits.npy", np.asarray(module.apply(variables, np.load(out / "tokens.npy"))))
arch = {"class": type(module).__module__ + ":" + type(module).__name__,
        "tuples": all(isinstance(getattr(module, a), tuple)
                      for a in ("block_heads", "block_kv_heads", "block_mlp")),
        "block_heads": module.block_heads, "block_kv_heads": module.block_kv_heads,
        "block_mlp": module.block_mlp,
        "params": sum(int(np.size(a)) for a in jax.tree.leaves(variables))}
(out / "loaded.json").write_text(json.dumps(arch))
"""


def test_slim_linen_gpt_loads_in_a_fresh_process_and_computes_the_same_logits(tmp_path):
  model = models.GPT(**GPT_KW)
  params = _random_linen(model, TOKENS, 0)["params"]
  # Block 0: out-projection rows of heads 1 and 3 (query index 1 of both groups);
  # block 1: MLP neurons 1 and 3 (their mlp_in columns).
  masks = _linen_masks(params, {("block_0", "attn/out"): (0, [1, 3]),
                                ("block_1", "mlp_in"): (1, [1, 3])})
  res = sl.slim_linen(model, {"params": params}, masks, TOKENS, count_flops=False)
  assert _count(params) == DENSE_GPT
  export.save(tmp_path / "model", res.module, res.variables, sample_input=TOKENS)
  np.save(tmp_path / "tokens.npy", TOKENS)
  _run_fresh(LOAD_LINEN, tmp_path)

  loaded = json.loads((tmp_path / "loaded.json").read_text())
  assert loaded == {"class": "examples.models:GPT", "tuples": True, "block_heads": [2, 4],
                    "block_kv_heads": [2, 2], "block_mlp": [5, 3],
                    "params": DENSE_GPT - TWO_HEADS - TWO_NEURONS}
  logits = np.load(tmp_path / "logits.npy")
  assert logits.shape == (2, 6, 11)
  np.testing.assert_allclose(logits, res.module.apply(res.variables, TOKENS), rtol=0, atol=1e-6)
  want = model.apply({"params": _masked(params, masks)}, TOKENS)   # the masked dense GPT
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  arch = json.loads((tmp_path / "model" / "architecture.json").read_text())
  assert arch["framework"] == "linen" and arch["class"] == "examples.models:GPT"
  assert arch["input"] == {"shape": [1, 6], "dtype": "int32"}


def test_slim_linen_vit_round_trip(tmp_path):
  model = models.ViT(num_classes=3, patch=4, d_model=D, depth=2, num_heads=HEADS, head_dim=HD,
                     mlp_dim=MLP, num_kv_heads=KV)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 1)), jnp.float32)
  params = _random_linen(model, x, 1)["params"]
  # Block 0 loses key / value group 1: its key and value heads and query heads 2, 3.
  masks = _linen_masks(params, {("block_0", "attn/query"): (1, [2, 3]),
                                ("block_0", "attn/key"): (1, [1]),
                                ("block_0", "attn/value"): (1, [1])})
  res = sl.slim_linen(model, {"params": params}, masks, x, count_flops=False)
  export.save(tmp_path / "vit", res.module, res.variables, sample_input=x)
  module, variables = export.load(tmp_path / "vit")

  assert type(module) is models.ViT and module.pool == "cls" and module.num_kv_heads == 2
  assert (module.block_heads, module.block_kv_heads, module.block_mlp) == ((2, 4), (1, 2), (5, 5))
  assert isinstance(module.block_heads, tuple)
  # Dense ViT: patch conv 4·4·1·8 + 8, class token 8, positions (4 patches + 1)·8,
  # 2 blocks of 341, final LayerNorm 16, head 8·3 + 3 = 909. Removed: 2 query heads
  # (68) and one key and one value head (2·(8·2 + 2) = 36).
  assert _count(params) == 909 and _count(variables) == 909 - 68 - 36
  x2 = jnp.asarray(np.random.default_rng(2).normal(size=(5, 8, 8, 1)), jnp.float32)
  np.testing.assert_allclose(module.apply(variables, x2), res.module.apply(res.variables, x2),
                             rtol=0, atol=1e-6)
  assert json.loads((tmp_path / "vit" / "architecture.json").read_text())["input"] == {
      "shape": [1, 8, 8, 1], "dtype": "float32"}


LOAD_NNX = """
import json, pathlib, sys
import jax, numpy as np
from flax import nnx
from examples import export
out = pathlib.Path(sys.argv[1])
model = export.load(out / "model")
np.save(out / "logits.npy", np.asarray(model(np.load(out / "tokens.npy"))))
arch = {"class": type(model).__module__ + ":" + type(model).__name__,
        "heads": [b.attn.query.kernel.shape[1] for b in model.blocks],
        "kv_heads": [b.attn.key.kernel.shape[1] for b in model.blocks],
        "mlp": [b.mlp_in.kernel.shape[1] for b in model.blocks],
        "tied": model.head is None,
        "params": sum(int(np.size(a)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))}
(out / "loaded.json").write_text(json.dumps(arch))
"""


def test_slim_nnx_gpt_loads_in_a_fresh_process_and_computes_the_same_logits(tmp_path):
  model = tnnx.GPT(**GPT_KW, tied=False, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype),
                                 nnx.state(model, nnx.Param)))
  # Block 0: MLP neurons 0 and 4 (their mlp_out rows); block 1: out-projection rows of
  # heads 0 and 2 (query index 0 of both groups).
  masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  masks["blocks"][0]["mlp_out"]["kernel"] = _mask((MLP, D), 0, [0, 4])
  masks["blocks"][1]["attn"]["out"]["kernel"] = _mask((HEADS, HD, D), 0, [0, 2])
  slim = sl.slim_nnx(model, masks, jnp.asarray(TOKENS), count_flops=False).module
  assert tnnx.count_params(model) == DENSE_GPT_UNTIED
  export.save(tmp_path / "model", slim)
  np.save(tmp_path / "tokens.npy", TOKENS)
  _run_fresh(LOAD_NNX, tmp_path)

  arch = json.loads((tmp_path / "model" / "architecture.json").read_text())
  assert arch == {"format": 1, "framework": "nnx", "class": "examples.transformers_nnx:GPT",
                  "arguments": {"vocab": 11, "context": 6, "d_model": D, "depth": 2,
                                "num_heads": [4, 2], "head_dim": HD, "mlp_dim": [3, 5],
                                "num_kv_heads": [2, 2], "tied": False}}
  loaded = json.loads((tmp_path / "loaded.json").read_text())
  assert loaded == {"class": "examples.transformers_nnx:GPT", "heads": [4, 2],
                    "kv_heads": [2, 2], "mlp": [3, 5], "tied": False,
                    "params": DENSE_GPT_UNTIED - TWO_HEADS - TWO_NEURONS}
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), slim(jnp.asarray(TOKENS)),
                             rtol=0, atol=1e-6)


# Block 0 with no head left (every out-projection row: its query heads, then the key /
# value heads no query reads): query 8·4·2 + 8, key and value 2·(8·2·2 + 4), out rows
# 4·2·8 = 72 + 72 + 64 = 208 go (the out bias stays); block 1 with no MLP neuron (every
# mlp_in column): mlp_in 8·5 + 5 and mlp_out rows 5·8 = 85 go.
NO_HEAD_BLOCK, NO_MLP_BLOCK = 208, 85


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_a_gpt_with_zero_width_layers_loads_in_a_fresh_process(tmp_path, framework):
  """Orbax stores no zero-size array: the export leaves them out and load rebuilds
  them from the architecture (issue 18, whole blocks)."""
  tokens = jnp.asarray(TOKENS)
  if framework == "linen":
    model = models.GPT(**GPT_KW)
    params = _random_linen(model, TOKENS, 4)["params"]
    masks = _linen_masks(params, {("block_0", "attn/out"): (0, range(HEADS)),
                                  ("block_1", "mlp_in"): (1, range(MLP))})
    res = sl.slim_linen(model, {"params": params}, masks, TOKENS, count_flops=False)
    export.save(tmp_path / "model", res.module, res.variables, sample_input=TOKENS)
    slim, dense = functools.partial(res.module.apply, res.variables), DENSE_GPT
    want = model.apply({"params": _masked(params, masks)}, tokens)
  else:
    model = tnnx.GPT(**GPT_KW, tied=False, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype),
                                   nnx.state(model, nnx.Param)))
    masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
    masks["blocks"][0]["attn"]["out"]["kernel"] = _mask((HEADS, HD, D), 0, range(HEADS))
    masks["blocks"][1]["mlp_in"]["kernel"] = _mask((D, MLP), 1, range(MLP))
    nnx.update(model, sl.apply_masks(nnx.state(model, nnx.Param), masks))
    want = model(tokens)   # the masked dense GPT
    slim, dense = sl.slim_nnx(model, masks, tokens, count_flops=False).module, DENSE_GPT_UNTIED
    export.save(tmp_path / "model", slim)
  np.save(tmp_path / "tokens.npy", TOKENS)
  _run_fresh(LOAD_LINEN if framework == "linen" else LOAD_NNX, tmp_path)

  loaded = json.loads((tmp_path / "loaded.json").read_text())
  assert loaded["params"] == dense - NO_HEAD_BLOCK - NO_MLP_BLOCK
  assert [loaded[k] for k in (("block_heads", "block_kv_heads", "block_mlp")
                              if framework == "linen" else ("heads", "kv_heads", "mlp"))] == [
      [0, HEADS], [0, KV], [MLP, 0]]
  logits = np.load(tmp_path / "logits.npy")
  np.testing.assert_allclose(logits, slim(tokens), rtol=0, atol=1e-6)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------------ bad input


def test_load_names_a_missing_architecture_and_an_unimportable_class(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "architecture.json")):
    export.load(tmp_path / "empty")
  for path in ("examples.no_such_module:GPT", "examples.models:NoSuchNet", "no colon"):
    (tmp_path / "bad").mkdir(exist_ok=True)
    (tmp_path / "bad" / "architecture.json").write_text(json.dumps(
        {"framework": "linen", "class": path, "attributes": {},
         "input": {"shape": [1, 6], "dtype": "int32"}}))
    with pytest.raises(ValueError, match=path):
      export.load(tmp_path / "bad")


def test_load_checks_shapes_and_save_refuses_overwriting(tmp_path):
  model = models.GPT(**GPT_KW)
  variables = model.init(jax.random.key(0), TOKENS)
  export.save(tmp_path / "m", model, variables, sample_input=TOKENS)
  with pytest.raises(FileExistsError, match="overwrite"):
    export.save(tmp_path / "m", model, variables, sample_input=TOKENS)
  arch = json.loads((tmp_path / "m" / "architecture.json").read_text())
  arch["attributes"]["block_mlp"] = [5, 4]   # not what the arrays are
  (tmp_path / "m" / "architecture.json").write_text(json.dumps(arch))
  with pytest.raises(ValueError, match="block_1/mlp_in/kernel: expected"):
    export.load(tmp_path / "m")
  export.save(tmp_path / "m", model, variables, sample_input=TOKENS, overwrite=True)
  module, restored = export.load(tmp_path / "m")
  np.testing.assert_array_equal(module.apply(restored, TOKENS), model.apply(variables, TOKENS))
  with pytest.raises(ValueError, match="sample_input"):
    export.save(tmp_path / "n", model, variables)
  with pytest.raises(ValueError, match="shapes"):   # a dense module with other arrays
    export.save(tmp_path / "n", model.clone(mlp_dim=7), variables, sample_input=TOKENS)
  assert not (tmp_path / "n" / "architecture.json").exists()


class _Unregistered(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(2, 3, rngs=rngs)


def test_save_refuses_models_it_cannot_describe(tmp_path):
  with pytest.raises(ValueError, match="_Unregistered"):
    export.save(tmp_path / "a", _Unregistered(nnx.Rngs(0)))
  resnet = models.ImageNetResNet(block=models.BasicBlock)   # a class as an attribute
  with pytest.raises(ValueError, match=r"ImageNetResNet\.block"):
    export.save(tmp_path / "b", resnet, {"params": {}}, sample_input=np.zeros((1, 8, 8, 3)))

  class Local(nn.Module):   # defined in a function: a fresh process cannot import it
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(x)

  x = np.zeros((1, 3), np.float32)
  with pytest.raises(ValueError, match="Local"):
    export.save(tmp_path / "c", Local(), Local().init(jax.random.key(0), x), sample_input=x)
  assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))
