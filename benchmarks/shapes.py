"""Parameter shape trees of standard architectures (Flax layout: HWIO conv kernels).

Built by hand from the architectures (BatchNorm ``scale``/``bias`` are trainable
parameters; running statistics are not and are left out). Leaves are
``jax.ShapeDtypeStruct`` so nothing is allocated until :func:`materialize`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _conv(k, cin, cout, bias=False, dtype=jnp.float32):
  d = {"kernel": jax.ShapeDtypeStruct((k, k, cin, cout), dtype)}
  if bias:
    d["bias"] = jax.ShapeDtypeStruct((cout,), dtype)
  return d


def _bn(c, dtype=jnp.float32):
  return {"scale": jax.ShapeDtypeStruct((c,), dtype), "bias": jax.ShapeDtypeStruct((c,), dtype)}


def _dense(cin, cout, dtype=jnp.float32):
  return {"kernel": jax.ShapeDtypeStruct((cin, cout), dtype),
          "bias": jax.ShapeDtypeStruct((cout,), dtype)}


def _block(cin: int, width: int, bottleneck: bool, dtype) -> dict:
  """A residual block: basic (two 3×3 convs) or bottleneck (1×1, 3×3, 1×1 to 4·width),
  each conv followed by BatchNorm, with a 1×1 projection where the width changes."""
  out = 4 * width if bottleneck else width
  if bottleneck:
    convs = ((1, cin, width), (3, width, width), (1, width, out))
  else:
    convs = ((3, cin, width), (3, width, width))
  blk = {}
  for i, (k, c_in, c_out) in enumerate(convs, 1):
    blk[f"conv{i}"] = _conv(k, c_in, c_out, dtype=dtype)
    blk[f"bn{i}"] = _bn(c_out, dtype)
  if cin != out:
    blk["proj"] = _conv(1, cin, out, dtype=dtype)
    blk["proj_bn"] = _bn(out, dtype)
  return blk


def lenet5(dtype=jnp.float32):
  """LeNet-5 (LeCun 1998) on 28×28 MNIST: conv5-6, conv5-16, fc 120-84-10."""
  return {"conv1": _conv(5, 1, 6, True, dtype), "conv2": _conv(5, 6, 16, True, dtype),
          "fc1": _dense(16 * 4 * 4, 120, dtype), "fc2": _dense(120, 84, dtype),
          "fc3": _dense(84, 10, dtype)}


def resnet20(dtype=jnp.float32):
  """CIFAR ResNet-20 (He 2016): 3 stages × 3 basic blocks, widths 16/32/64."""
  p = {"conv_init": _conv(3, 3, 16, dtype=dtype), "bn_init": _bn(16, dtype)}
  cin = 16
  for s, w in enumerate((16, 32, 64)):
    for b in range(3):
      p[f"stage{s}_block{b}"] = _block(cin, w, False, dtype)
      cin = w
  p["head"] = _dense(64, 10, dtype)
  return p


def _imagenet_resnet(blocks, bottleneck, dtype):
  p = {"conv_init": _conv(7, 3, 64, dtype=dtype), "bn_init": _bn(64, dtype)}
  cin = 64
  for s, (n, w) in enumerate(zip(blocks, (64, 128, 256, 512))):
    for b in range(n):
      p[f"stage{s}_block{b}"] = _block(cin, w, bottleneck, dtype)
      cin = 4 * w if bottleneck else w
  p["head"] = _dense(cin, 1000, dtype)
  return p


def resnet18(dtype=jnp.float32):
  """ImageNet ResNet-18: basic blocks [2, 2, 2, 2]."""
  return _imagenet_resnet((2, 2, 2, 2), False, dtype)


def resnet50(dtype=jnp.float32):
  """ImageNet ResNet-50: bottleneck blocks [3, 4, 6, 3]."""
  return _imagenet_resnet((3, 4, 6, 3), True, dtype)


def vgg16(dtype=jnp.float32):
  """ImageNet VGG-16 (configuration D): 13 conv3 layers with biases, fc 4096-4096-1000."""
  p, cin = {}, 3
  for i, w in enumerate((64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
    p[f"conv{i}"] = _conv(3, cin, w, True, dtype)
    cin = w
  p["fc0"] = _dense(512 * 7 * 7, 4096, dtype)
  p["fc1"] = _dense(4096, 4096, dtype)
  p["fc2"] = _dense(4096, 1000, dtype)
  return p


def _layer_norm(d, dtype=jnp.float32):
  return {"scale": jax.ShapeDtypeStruct((d,), dtype), "bias": jax.ShapeDtypeStruct((d,), dtype)}


def transformer(layers: int = 24, d_model: int = 2048, mlp_ratio: int = 4, vocab: int = 32000,
                max_len: int = 2048, dtype=jnp.float32):
  """A GPT-style decoder: token and position embeddings, ``layers`` pre-LN blocks, final LN.

  Each block: LayerNorm, attention (query / key / value / out dense d×d with
  biases), LayerNorm, MLP (d × ``mlp_ratio``·d and back, with biases). Parameters:
  ``layers``·(12·d² + 13·d) + (vocab + max_len)·d + 2·d for ``mlp_ratio`` 4; the
  defaults give 1,278,332,928 (the "1.3B" tree). Under the default penalty its
  2-D leaves (dense kernels and embeddings) get a lasso, its 1-D leaves none.
  """
  p = {"token_embed": {"embedding": jax.ShapeDtypeStruct((vocab, d_model), dtype)},
       "pos_embed": {"embedding": jax.ShapeDtypeStruct((max_len, d_model), dtype)}}
  hidden = mlp_ratio * d_model
  for i in range(layers):
    p[f"block{i}"] = {
        "ln1": _layer_norm(d_model, dtype),
        "attn": {n: _dense(d_model, d_model, dtype) for n in ("query", "key", "value", "out")},
        "ln2": _layer_norm(d_model, dtype),
        "mlp": {"fc1": _dense(d_model, hidden, dtype), "fc2": _dense(hidden, d_model, dtype)}}
  p["ln_final"] = _layer_norm(d_model, dtype)
  return p


def transformer_tiny(dtype=jnp.float32):
  """:func:`transformer` with 1 block, d 32, vocab 100, 16 positions (smoke runs)."""
  return transformer(1, 32, 4, 100, 16, dtype)


ARCHS = {"LeNet-5": lenet5, "ResNet-20": resnet20, "ResNet-18": resnet18,
         "ResNet-50": resnet50, "VGG-16": vgg16, "Transformer-1.3B": transformer,
         "Transformer-tiny": transformer_tiny}


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def num_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def materialize(tree, seed: int = 0, scale: float = 0.05):
  """Random arrays (each its own buffer) of the shapes and dtypes in ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      (scale * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
      for k, x in zip(keys, leaves)])
