"""Slimming every example model: outputs, widths and parameter counts by hand.

Each architecture is described here by hand (independently of the dependency
analysis): its layers, which layers *produce* the same channels (a residual
stage: the stem or the projection and every block's last conv), what each layer
reads, and whether a channel's constant value would reach a zero-padded conv.
Masks prune some but not all filters / neurons of every layer; in a coupled
group a set of channels is pruned by every producer (removable) and each
producer prunes extra channels of its own (kept by the coupling). The expected
slim width of a group is its size minus the channels every producer prunes;
parameter counts follow from the widths by the usual formulas.

BatchNorm statistics, scales and shifts and all biases are random. Removed
channels are constants in the masked model; where such a constant reaches a
zero-padded conv its shift is made negative (ReLU makes it 0), elsewhere
(dense after a flatten / global pool, VALID and 1×1 convs) it stays random and
the slim model is exact only if it was folded into the next bias / BN mean.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_splitlbi as sl
from examples import models

EPS = 1e-5  # BatchNorm epsilon of the example models


@dataclasses.dataclass(frozen=True)
class Layer:
  kernel: str                  # module path of the conv / dense layer
  out: str                     # the channel group it produces
  inp: object                  # the group it reads, or the input channel count
  ksize: int = 9               # kernel height × width (1 for dense)
  in_mult: int = 1             # spatial positions flattened into a dense input
  norm: Optional[str] = None   # its BatchNorm module path
  bias: bool = True


@dataclasses.dataclass(frozen=True)
class Arch:
  layers: list
  sizes: dict                  # group → channels
  padded: frozenset            # groups whose constants reach a zero-padded conv


def _plain(convs, hidden, in_ch, flat, padded_convs):
  layers, sizes, prev = [], {}, in_ch
  for i, c in enumerate(convs):
    layers.append(Layer(f"Conv_{i}", f"Conv_{i}", prev, ksize=c[1]))
    sizes[f"Conv_{i}"], prev = c[0], f"Conv_{i}"
  mult = flat
  for i, h in enumerate(list(hidden) + [10]):
    out = f"Dense_{i}" if i < len(hidden) else "logits"
    layers.append(Layer(f"Dense_{i}", out, prev, ksize=1, in_mult=mult))
    sizes[out], prev, mult = h, out, 1
  return Arch(layers, sizes, frozenset(f"Conv_{i}" for i in padded_convs))


def _vgg(width):
  cfg = [max(1, int(v * width)) for v in models.VGG16_CFG if v != "M"]
  layers, sizes, prev = [], {}, 3
  for i, c in enumerate(cfg):
    layers.append(Layer(f"Conv_{i}", f"Conv_{i}", prev, norm=f"BatchNorm_{i}", bias=False))
    sizes[f"Conv_{i}"], prev = c, f"Conv_{i}"
  layers.append(Layer("Dense_0", "logits", prev, ksize=1))
  sizes["logits"] = 10
  return Arch(layers, sizes, frozenset(f"Conv_{i}" for i in range(len(cfg) - 1)))


def _resnet(stage_sizes, width, bottleneck, stem, stem_ksize, block_name):
  """Layers of a ResNet: residual groups s0, s1, ... coupled over each stage."""
  layers, sizes, padded = [], {}, set()
  expansion = 4 if bottleneck else 1
  first = "s0" if not bottleneck else "stem"
  layers.append(Layer(stem[0], first, 3, ksize=stem_ksize, norm=stem[1], bias=False))
  sizes[first] = width
  prev, k = first, 0
  for i, n in enumerate(stage_sizes):
    f = width * 2**i
    sizes[f"s{i}"] = expansion * f
    for b in range(n):
      blk = f"{block_name}_{k}"
      if bottleneck:
        convs = [(f"{blk}/Conv_0", f"b{k}a", f, 1), (f"{blk}/Conv_1", f"b{k}b", f, 9),
                 (f"{blk}/Conv_2", f"s{i}", expansion * f, 1)]
        padded.add(f"b{k}a")
      else:
        convs = [(f"{blk}/Conv_0", f"b{k}", f, 9), (f"{blk}/Conv_1", f"s{i}", f, 9)]
        padded.update({f"b{k}", f"s{i}"})
      src = prev
      for j, (path, group, size, ks) in enumerate(convs):
        layers.append(Layer(path, group, src, ksize=ks, norm=f"{blk}/BatchNorm_{j}", bias=False))
        sizes[group], src = size, group
      if b == 0 and (i > 0 or bottleneck):
        layers.append(Layer(f"{blk}/proj_conv", f"s{i}", prev, ksize=1, norm=f"{blk}/proj_bn",
                            bias=False))
      prev, k = f"s{i}", k + 1
  if not bottleneck:
    padded.add("s0")
  layers.append(Layer("Dense_0", "logits", prev, ksize=1))
  sizes["logits"] = 10
  return Arch(layers, sizes, frozenset(padded))


# name → (model kwargs, input shape, architecture by hand)
CASES = {
    "digits_cnn": ({}, (8, 8, 1), _plain([(16, 9), (32, 9)], [64], 1, 16, [0])),
    "lenet5": ({}, (28, 28, 1), _plain([(6, 25), (16, 25)], [120, 84], 1, 25, [])),
    "conv2": ({"features": (8, 8), "hidden": (16, 12)}, (12, 12, 1),
              _plain([(8, 9), (8, 9)], [16, 12], 1, 36, [0])),
    "conv4": ({"features": (8, 8, 12, 12), "hidden": (16, 12)}, (12, 12, 1),
              _plain([(8, 9), (8, 9), (12, 9), (12, 9)], [16, 12], 1, 9, [0, 1, 2])),
    "vgg16": ({"width": 0.125}, (32, 32, 3), _vgg(0.125)),
    "resnet20": ({"width": 4}, (8, 8, 3),
                 _resnet((3, 3, 3), 4, False, ("Conv_0", "BatchNorm_0"), 9, "BasicBlock")),
    "resnet56": ({"width": 2}, (8, 8, 3),
                 _resnet((9, 9, 9), 2, False, ("Conv_0", "BatchNorm_0"), 9, "BasicBlock")),
    "resnet18": ({"width": 4}, (32, 32, 3),
                 _resnet((2, 2, 2, 2), 4, False, ("conv_init", "bn_init"), 49, "BasicBlock")),
    "resnet50": ({"width": 2, "small_inputs": True}, (8, 8, 3),
                 _resnet((3, 4, 6, 3), 2, True, ("conv_init", "bn_init"), 9, "BottleneckBlock")),
}


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _plan_masks(arch: Arch, rng) -> tuple[dict, dict]:
  """Per layer: pruned channels; per group: channels every producer prunes."""
  pruned, removed = {}, {}
  for group, n in arch.sizes.items():
    producers = [l for l in arch.layers if l.out == group]
    if group == "logits":
      continue
    common = rng.permutation(n)[:max(1, n // 3)]
    for l in producers:
      extra = rng.random(n) < 0.3
      extra[common] = True
      if extra.all():
        extra[rng.choice(np.setdiff1d(np.arange(n), common))] = False
      pruned[l.kernel] = extra
    removed[group] = np.logical_and.reduce([pruned[l.kernel] for l in producers])
  return pruned, removed


def _masks(arch, params, pruned, rng):
  masks = jax.tree.map(lambda _: None, params)
  for i, l in enumerate(arch.layers):
    shape = _get(params, l.kernel)["kernel"].shape
    if l.out == "logits":
      m = rng.random(shape) > 0.3                                # lasso on the classifier
    elif len(shape) == 2 and i % 2:
      m = ~pruned[l.kernel][None, :]                             # keepdims (group_support)
    else:
      m = np.broadcast_to(~pruned[l.kernel], shape)              # full shape (support)
    _get(masks, l.kernel)["kernel"] = m
  return masks


def random_variables(model, x, rng):
  """Variables of ``model`` with random kernels, biases and BatchNorm statistics.

  (Drawn in NumPy from the shapes of ``init``: no initializer is compiled.)
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

  def draw(path, a):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name.endswith("kernel"):
      x = rng.normal(0.0, np.sqrt(2.0 / np.prod(a.shape[:-1])), a.shape)
    elif name.endswith("var"):
      x = rng.uniform(0.5, 2.0, a.shape)
    elif name.endswith("scale"):
      x = rng.uniform(0.5, 1.5, a.shape)
    else:  # biases, BatchNorm shifts and means
      x = rng.normal(0.0, 0.5, a.shape)
    return np.asarray(x, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _silence_padded(arch, variables, removed, rng):
  """Removed channels that reach a zero-padded conv: a negative shift (ReLU → 0)."""
  v = jax.tree.map(np.array, variables)
  for l in arch.layers:
    if l.out not in arch.padded:
      continue
    idx = np.flatnonzero(removed[l.out])
    neg = -1.0 - np.abs(rng.normal(size=idx.size))
    if l.norm:
      bn, st = _get(v["params"], l.norm), _get(v["batch_stats"], l.norm)
      bn["bias"][idx] = bn["scale"][idx] * st["mean"][idx] / np.sqrt(st["var"][idx] + EPS) + neg
    else:
      _get(v["params"], l.kernel)["bias"][idx] = neg
  return v


def _count_by_hand(arch, width):
  n = 0
  for l in arch.layers:
    cin = l.inp if isinstance(l.inp, int) else width[l.inp]
    n += l.ksize * l.in_mult * cin * width[l.out]
    n += width[l.out] * ((1 if l.bias else 0) + (2 if l.norm else 0))
  return n


def _masked_apply(model, variables, masks, x):
  """The masked dense model W ∘ mask (eval mode), computed directly."""
  def run(v, x):
    params = jax.tree.map(lambda p, m: p if m is None else p * m, v["params"], masks,
                          is_leaf=lambda m: m is None)
    return model.apply(dict(v, params=params), x, train=False)
  return jax.jit(run)(variables, x)


@pytest.mark.parametrize("name", list(CASES))
def test_slim_example_model_matches_masked_model_and_hand_counts(name):
  kwargs, shape, arch = CASES[name]
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  model = models.get_model(name, 10, **kwargs)
  x = jnp.asarray(rng.normal(size=(3, *shape)), jnp.float32)
  variables = random_variables(model, x, rng)
  pruned, removed = _plan_masks(arch, rng)
  variables = _silence_padded(arch, variables, removed, rng)
  masks = _masks(arch, variables["params"], pruned, rng)

  res = sl.slim_linen(model, variables, masks, x, count_flops=False, verify=False, train=False)

  # Widths: a group keeps every channel some producer keeps.
  width = {g: n - int(removed[g].sum()) if g in removed else n for g, n in arch.sizes.items()}
  slim_params = res.variables["params"]
  for l in arch.layers:
    k = _get(slim_params, l.kernel)["kernel"]
    cin = l.inp if isinstance(l.inp, int) else width[l.inp]
    assert k.shape[-1] == width[l.out] and k.shape[-2] == cin * l.in_mult, (l.kernel, k.shape)
    assert 0 < width[l.out] and (l.out == "logits" or width[l.out] < arch.sizes[l.out])
  n_slim = _count_by_hand(arch, width)
  assert n_slim == sum(x.size for x in jax.tree.leaves(slim_params)) == res.report["params"]["slim"]
  assert _count_by_hand(arch, arch.sizes) == res.report["params"]["dense"]
  init = jax.eval_shape(lambda: res.module.init(jax.random.key(0), x, train=False))
  assert sum(x.size for x in jax.tree.leaves(init["params"])) == n_slim

  # Outputs: the slim module computes the masked dense model (another batch size).
  x2 = jnp.asarray(rng.normal(size=(5, *shape)), jnp.float32)
  want = np.asarray(_masked_apply(model, variables, masks, x2))
  tol = dict(rtol=2e-4, atol=2e-5 * np.abs(want).max())
  got = jax.jit(lambda v, x: res.module.apply(v, x, train=False))(res.variables, x2)
  np.testing.assert_allclose(got, want, **tol)
  assert all(f["exact"] for f in res.report["folds"])
  # Channels pruned by one producer of a coupled group are kept, and said why.
  for l in arch.layers:
    if l.out == "logits":
      continue
    rep = res.report["layers"][f"params/{l.kernel}/kernel"]
    kept_pruned = int((pruned[l.kernel] & ~removed[l.out]).sum())
    assert (rep["pruned"], rep["kept_pruned"]) == (int(pruned[l.kernel].sum()), kept_pruned)
    if kept_pruned:
      assert any("coupled with" in why for why in rep["kept_because"]), rep


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "resnet50"])
def test_coupled_channels_are_the_hand_described_groups(name):
  kwargs, shape, arch = CASES[name]
  model = models.get_model(name, 10, **kwargs)
  x = jnp.zeros((2, *shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  got = sl.coupled_channels(lambda v, x: model.apply(v, x, train=False), variables, x)
  want = {}
  for l in arch.layers:
    axis = 1 if l.ksize == 1 and l.in_mult >= 1 and l.kernel.startswith("Dense") else 3
    want.setdefault(l.out, set()).add((f"params/{l.kernel}/kernel", axis))
  assert sorted(map(set, got), key=sorted) == sorted(want.values(), key=sorted)
