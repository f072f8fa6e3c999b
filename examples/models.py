"""Flax Linen models of the paper's experiments (NHWC images, HWIO conv kernels).

Every model is an ``nn.Module`` called as ``model.apply(variables, x, train=...)``
with ``x`` of shape (batch, height, width, channels). Conv kernels are HWIO, so
the default SplitLBI penalty (:func:`optax_splitlbi.default_penalty`) puts one
group-lasso group on each output filter and a lasso on dense kernels.

Models with BatchNorm keep running statistics in the ``"batch_stats"``
collection (pass ``mutable=["batch_stats"]`` when ``train=True``).

Every model takes its layer widths as attributes (defaults: the paper's) and
has ``resized(shapes)``, which returns the same model with the widths of a
params-shaped tree of shapes: :func:`optax_splitlbi.slim_linen` uses it to
rebuild a slimmed network.

=================  ==========================================  =====================
name               architecture                                 paper
=================  ==========================================  =====================
``digits_cnn``     2 conv + 2 dense, for 8×8 sklearn digits     (embedded default)
``lenet5``         LeNet-5: conv6-pool-conv16-pool-120-84       Table 1, Fig. 1
``lenet3``         LeNet-300-100 (3 dense layers)               App. D, Table 7
``conv2``          Conv-2 (Frankle & Carbin): 64,64,pool,256²   App. D, Table 8
``conv4``          Conv-4: 64,64,pool,128,128,pool,256²         App. D, Table 9
``resnet20``       CIFAR ResNet-20 (He et al. 2016), 16-32-64   Table 1
``resnet56``       CIFAR ResNet-56                              Tables 2-5, Fig. 5
``vgg16``          VGG-16 with BatchNorm (CIFAR variant)        Tables 2-5, Fig. 5
``resnet18``       ImageNet ResNet-18                           Table 1, Fig. 2
``resnet50``       ImageNet ResNet-50 (bottleneck)              Fig. 5 (Lasso)
``vit``            ViT, 4×4 patches, d 64, 4 blocks × 4 heads   (transformer slimming)
=================  ==========================================  =====================

Also here (not registered): :class:`GPT`, a decoder-only byte-level language model
(int tokens in, logits out), and :func:`attend` / :class:`GQAttention`, grouped-query
attention with the heads as tensor axes; the NNX GPT is in
``examples/transformers_nnx.py``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp


def sized(init: Callable) -> Callable:
  """``init``, or zeros for a zero-size shape: a layer slimmed to no channels
  (fan-in or fan-out 0, where variance scaling would divide by zero)."""
  def wrapped(key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype) if math.prod(shape) == 0 else init(key, shape, dtype)
  return wrapped


# He et al. (2015) initialisation, as the paper (Sec. 4) and torchvision.
he_normal = sized(nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
lecun_normal = sized(nn.linear.default_kernel_init)  # Flax's default, zero-size safe


def _flatten(x):
  return x.reshape((x.shape[0], -1))


def _dense_head(x, hidden: Sequence[int], num_classes: int):
  """Flattens ``x``, then ReLU dense layers of widths ``hidden``, then the logits."""
  x = _flatten(x)
  for h in hidden:
    x = nn.relu(nn.Dense(h, kernel_init=lecun_normal)(x))
  return nn.Dense(num_classes, kernel_init=lecun_normal)(x)


def _out(shapes: Any, name: str) -> int:
  """Output features of layer ``name`` in a params-shaped tree of shapes."""
  return int(shapes[name]["kernel"][-1])


def _widths(shapes: Any, prefix: str, n: int, start: int = 0) -> tuple[int, ...]:
  return tuple(_out(shapes, f"{prefix}_{i}") for i in range(start, start + n))


class _ConvDense(nn.Module):
  """Convs of widths ``features``, then ReLU dense layers of widths ``hidden``, then
  the logits (``num_classes``); ``resized`` reads both width lists back."""

  num_classes: int = 10
  features: Sequence[int] = ()
  hidden: Sequence[int] = ()

  def resized(self, shapes: Any) -> "_ConvDense":
    return self.clone(features=_widths(shapes, "Conv", len(self.features)),
                      hidden=_widths(shapes, "Dense", len(self.hidden)))


class DigitsCNN(_ConvDense):
  """A small CNN for the 8×8 scikit-learn digits: conv-conv-pool-dense-dense."""

  features: Sequence[int] = (16, 32)
  hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    for f in self.features:
      x = nn.relu(nn.Conv(f, (3, 3), kernel_init=he_normal)(x))
    return _dense_head(nn.max_pool(x, (2, 2), (2, 2)), self.hidden, self.num_classes)


class LeNet5(_ConvDense):
  """LeNet-5 (LeCun et al. 1998): conv5×5(6, SAME)-pool-conv5×5(16)-pool-120-84."""

  features: Sequence[int] = (6, 16)
  hidden: Sequence[int] = (120, 84)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = nn.relu(nn.Conv(self.features[0], (5, 5), padding="SAME", kernel_init=he_normal)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(self.features[1], (5, 5), padding="VALID", kernel_init=he_normal)(x))
    return _dense_head(nn.max_pool(x, (2, 2), (2, 2)), self.hidden, self.num_classes)


class LeNet3(_ConvDense):
  """LeNet-300-100, the "LeNet-3" of App. D (FC1 784×300, FC2 300×100, FC3)."""

  hidden: Sequence[int] = (300, 100)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    return _dense_head(x, self.hidden, self.num_classes)


class ConvN(_ConvDense):
  """Conv-2 / Conv-4 / Conv-6 of Frankle & Carbin (2019), used in App. D.

  3×3 SAME convs, 2×2 max-pool after every two convs, then dense 256-256-classes.
  """

  features: Sequence[int] = (64, 64)
  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), kernel_init=he_normal)(x))
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    return _dense_head(x, self.hidden, self.num_classes)


def _bn(train: bool, **kw):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, **kw)


def _projects(project: Optional[bool], x, features: int, strides: int) -> bool:
  if project is not None:
    return project
  return x.shape[-1] != features or strides != 1


class _ResidualBlock(nn.Module):
  """The fields of a ResNet block and its shortcut: ``relu(x + y)``, ``x`` projected
  (1×1 conv + BN, ``proj_conv`` / ``proj_bn``) where ``project`` says so (default:
  where the shape changes). ``widths`` describes slimmed blocks."""

  features: int
  strides: int = 1
  widths: Optional[Sequence[int]] = None
  project: Optional[bool] = None

  def add_shortcut(self, x, y, train: bool):
    out, s = y.shape[-1], (self.strides, self.strides)
    if _projects(self.project, x, out, self.strides):
      x = nn.Conv(out, (1, 1), s, use_bias=False, kernel_init=he_normal, name="proj_conv")(x)
      x = _bn(train, name="proj_bn")(x)
    return nn.relu(x + y)


class BasicBlock(_ResidualBlock):
  """ResNet basic block: 3×3 conv-BN-ReLU-3×3 conv-BN + (projected) shortcut;
  ``widths`` defaults to ``(features, features)``."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    inner, out = self.widths or (self.features, self.features)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=he_normal)
    y = conv(inner, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(_bn(train)(y))
    y = conv(out, (3, 3))(y)
    return self.add_shortcut(x, _bn(train, scale_init=nn.initializers.zeros_init())(y), train)


class BottleneckBlock(_ResidualBlock):
  """ResNet bottleneck block: 1×1 (f) - 3×3 (f, stride) - 1×1 (4f) + shortcut;
  ``widths`` defaults to ``(f, f, 4f)``."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    f = self.features
    w1, w2, out = self.widths or (f, f, 4 * f)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=he_normal)
    y = nn.relu(_bn(train)(conv(w1, (1, 1))(x)))
    y = nn.relu(_bn(train)(conv(w2, (3, 3), (self.strides, self.strides))(y)))
    y = conv(out, (1, 1))(y)
    return self.add_shortcut(x, _bn(train, scale_init=nn.initializers.zeros_init())(y), train)


def _block_kwargs(module, k: int) -> dict:
  """Slim widths / projection of the ``k``-th block of a ResNet (if given)."""
  kw = {}
  if module.block_widths is not None:
    kw["widths"] = tuple(module.block_widths[k])
  if module.block_projections is not None:
    kw["project"] = bool(module.block_projections[k])
  return kw


def _resnet_resized(module, shapes: Any, stem: str):
  """A ResNet clone with the stem / block widths of ``shapes``."""
  blocks = sorted((k for k in shapes if re.fullmatch(r"\w+Block_\d+", k)),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
  widths = tuple(_widths(shapes[b], "Conv", sum(1 for c in shapes[b] if c.startswith("Conv_")))
                 for b in blocks)
  return module.clone(stem_width=_out(shapes, stem), block_widths=widths,
                      block_projections=tuple("proj_conv" in shapes[b] for b in blocks))


class CifarResNet(nn.Module):
  """CIFAR ResNet-(6n+2) of He et al. (2016): 3 stages of n basic blocks.

  Attributes:
    num_classes: output classes.
    blocks_per_stage: n (3 → ResNet-20, 9 → ResNet-56).
    width: filters of the first stage (16; doubled at each stage).
    stem_width, block_widths, block_projections: slimmed widths of the stem
      conv and of each block's convs, and which blocks project the shortcut
      (``None``: the nominal ones).
  """

  num_classes: int = 10
  blocks_per_stage: int = 3
  width: int = 16
  stem_width: Optional[int] = None
  block_widths: Optional[Sequence[Sequence[int]]] = None
  block_projections: Optional[Sequence[bool]] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    stem = self.width if self.stem_width is None else self.stem_width
    x = nn.Conv(stem, (3, 3), use_bias=False, kernel_init=he_normal)(x)
    x = nn.relu(_bn(train)(x))
    k = 0
    for stage in range(3):
      for b in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and b == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, **_block_kwargs(self, k))(x, train)
        k += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=lecun_normal)(x)

  def resized(self, shapes: Any) -> "CifarResNet":
    return _resnet_resized(self, shapes, "Conv_0")


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
             512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
  """VGG with BatchNorm, CIFAR variant (as in Network Slimming / the lottery code).

  conv3×3-BN-ReLU per number in ``cfg``, 2×2 max-pool at "M", global average
  pool, one dense classifier. ``width`` scales every conv (tests use < 1).
  """

  num_classes: int = 10
  cfg: Sequence[Any] = VGG16_CFG
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    for v in self.cfg:
      if v == "M":
        if x.shape[1] > 1:
          x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      filters = v if self.width == 1.0 else max(1, int(v * self.width))  # slim: may be 0
      x = nn.Conv(filters, (3, 3), use_bias=False, kernel_init=he_normal)(x)
      x = nn.relu(_bn(train)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=lecun_normal)(x)

  def resized(self, shapes: Any) -> "VGG":
    convs = iter(_widths(shapes, "Conv", sum(1 for v in self.cfg if v != "M")))
    return self.clone(cfg=tuple(v if v == "M" else next(convs) for v in self.cfg), width=1.0)


class ImageNetResNet(nn.Module):
  """ImageNet ResNet (He et al. 2016): 7×7/2 stem, max-pool, 4 stages, avg-pool.

  Attributes:
    num_classes: output classes (1000 for ImageNet).
    stage_sizes: blocks per stage ((2,2,2,2) ResNet-18, (3,4,6,3) ResNet-50).
    block: ``BasicBlock`` or ``BottleneckBlock``.
    width: filters of the first stage (64).
    small_inputs: CIFAR stem (3×3/1 conv, no max-pool) for 32×32 images, as the
      ResNet-50 (Lasso) lottery run of Fig. 5.
    stem_width, block_widths, block_projections: slimmed widths (see
      :class:`CifarResNet`).
  """

  num_classes: int = 1000
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: Callable[..., nn.Module] = BasicBlock
  width: int = 64
  small_inputs: bool = False
  stem_width: Optional[int] = None
  block_widths: Optional[Sequence[Sequence[int]]] = None
  block_projections: Optional[Sequence[bool]] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    stem = self.width if self.stem_width is None else self.stem_width
    if self.small_inputs:
      x = nn.Conv(stem, (3, 3), use_bias=False, kernel_init=he_normal, name="conv_init")(x)
      x = nn.relu(_bn(train, name="bn_init")(x))
    else:
      x = nn.Conv(stem, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                  kernel_init=he_normal, name="conv_init")(x)
      x = nn.relu(_bn(train, name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    k = 0
    for i, n in enumerate(self.stage_sizes):
      for b in range(n):
        strides = 2 if i > 0 and b == 0 else 1
        x = self.block(self.width * 2**i, strides, **_block_kwargs(self, k))(x, train)
        k += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=lecun_normal)(x)

  def resized(self, shapes: Any) -> "ImageNetResNet":
    return _resnet_resized(self, shapes, "conv_init")



# ------------------------------------------------------------------- transformers


def attend(q, k, v, causal: bool = False):
  """Grouped-query dot-product attention with the heads as real tensor axes.

  The ``H = K·G`` query heads are split into ``K`` groups of ``G``, group ``k``
  attending with key / value head ``k`` (an einsum over the group axis, no
  ``repeat`` of the key / value heads), so the slimming analysis sees which
  query heads a key / value head serves. ``K = H`` is multi-head attention.

  Args:
    q: queries (batch, T, H, D).
    k: keys (batch, S, K, D), ``K`` dividing ``H``.
    v: values (batch, S, K, Dv).
    causal: position ``t`` attends to positions ``≤ t`` only (needs ``S = T``).

  Returns:
    The heads' outputs (batch, T, H, Dv).
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv if kv else 0, d)  # kv = 0: a block slimmed to no heads
  s = jnp.einsum("btkgd,bskd->bkgts", q, k) * (d ** -0.5)
  if causal:
    s = jnp.where(jnp.tril(jnp.ones((t, k.shape[1]), bool)), s, jnp.finfo(s.dtype).min)
  w = nn.softmax(s, axis=-1)
  return jnp.einsum("bkgts,bskd->btkgd", w, v).reshape(b, t, h, v.shape[-1])


class GQAttention(nn.Module):
  """Self-attention with ``num_kv_heads`` key / value heads shared by groups of
  ``num_heads // num_kv_heads`` query heads (GQA; ``None``: ``num_heads``).

  Projections ``query`` (d, H, D), ``key`` / ``value`` (d, K, D) and ``out``
  (H, Dv, d) are ``DenseGeneral`` so a head is an axis of every kernel.
  ``v_head_dim`` (default ``head_dim``) is the value heads' width (slimming may
  cut it where the output projection ignores some value dims). ``init_std``:
  the kernels' initial standard deviation (``None``: LeCun normal).
  """

  num_heads: int
  head_dim: int
  num_kv_heads: Optional[int] = None
  v_head_dim: Optional[int] = None
  causal: bool = False
  init_std: Optional[float] = None

  @nn.compact
  def __call__(self, x):
    kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads  # may be 0
    dense = functools.partial(nn.DenseGeneral, kernel_init=_kernel_init(self.init_std))
    q = dense((self.num_heads, self.head_dim), name="query")(x)
    k = dense((kv, self.head_dim), name="key")(x)
    v = dense((kv, self.head_dim if self.v_head_dim is None else self.v_head_dim), name="value")(x)
    return dense(x.shape[-1], axis=(-2, -1), name="out")(attend(q, k, v, self.causal))


def _kernel_init(std: Optional[float]) -> Callable:
  """N(0, std²) (GPT-2 uses 0.02), or Flax's default LeCun normal for ``None``
  (zeros for a zero-size kernel: a block slimmed to no heads / neurons)."""
  return lecun_normal if std is None else sized(nn.initializers.normal(std))


class TransformerBlock(nn.Module):
  """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp_out(gelu(mlp_in(ln2(x))))``.

  ``attn`` is the block's (unbound) :class:`GQAttention`; Linen adopts it as the
  submodule ``attn``.
  """

  attn: GQAttention
  mlp_dim: int
  init_std: Optional[float] = None

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, kernel_init=_kernel_init(self.init_std))
    x = x + self.attn(nn.LayerNorm(name="ln1")(x))
    y = nn.gelu(dense(self.mlp_dim, name="mlp_in")(nn.LayerNorm(name="ln2")(x)))
    return x + dense(x.shape[-1], name="mlp_out")(y)


def _blocks(module, x, causal: bool):
  """The ``depth`` blocks of a ViT / GPT at its (per-block, slim) widths."""
  for i in range(module.depth):
    pick = lambda widths, default: default if widths is None else widths[i]  # noqa: E731
    attn = GQAttention(pick(module.block_heads, module.num_heads), module.head_dim,
                       pick(module.block_kv_heads, module.num_kv_heads),
                       pick(module.block_v_dims, module.head_dim), causal, module.init_std,
                       parent=None)
    x = TransformerBlock(attn, pick(module.block_mlp, module.mlp_dim), module.init_std,
                         name=f"block_{i}")(x)
  return x


class _Transformer(nn.Module):
  """The widths a ViT and a GPT share, and ``resized`` for both.

  Attributes:
    d_model, depth, num_heads, head_dim, mlp_dim: the nominal widths.
    num_kv_heads: key / value heads (GQA); ``None``: ``num_heads``.
    init_std: the blocks' kernels start N(0, init_std²) (GPT-2: 0.02); ``None``:
      LeCun normal (std 1/√fan-in).
    block_heads, block_kv_heads, block_v_dims, block_mlp: slim query heads, key
      / value heads, value head widths and MLP widths per block (``None``: the
      nominal ones); set by ``resized``.
  """

  d_model: int = 64
  depth: int = 4
  num_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  num_kv_heads: Optional[int] = None
  init_std: Optional[float] = None
  block_heads: Optional[Sequence[int]] = None
  block_kv_heads: Optional[Sequence[int]] = None
  block_v_dims: Optional[Sequence[int]] = None
  block_mlp: Optional[Sequence[int]] = None

  def resized(self, shapes: Any) -> "_Transformer":
    """A clone with the per-block head counts and MLP widths of ``shapes``."""
    attn = [shapes[f"block_{i}"]["attn"] for i in range(self.depth)]
    return self.clone(block_heads=tuple(int(a["query"]["kernel"][1]) for a in attn),
                      block_kv_heads=tuple(int(a["key"]["kernel"][1]) for a in attn),
                      block_v_dims=tuple(int(a["value"]["kernel"][2]) for a in attn),
                      block_mlp=tuple(_out(shapes[f"block_{i}"], "mlp_in")
                                      for i in range(self.depth)))


class ViT(_Transformer):
  """Vision Transformer (Dosovitskiy et al. 2021), pre-LayerNorm, GQA-capable.

  ``patch``×``patch`` patches embedded by a conv (kernel = stride = patch), a
  class token (``pool="cls"``) or the mean of the tokens (``pool="mean"``),
  learned position embeddings, ``depth`` blocks, a final LayerNorm, a dense head.

  Attributes:
    num_classes, patch, pool; the widths of :class:`_Transformer`.
  """

  num_classes: int = 10
  patch: int = 4
  pool: str = "cls"

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    p = self.patch
    x = nn.Conv(self.d_model, (p, p), (p, p), padding="VALID", name="embed")(x)
    x = x.reshape((x.shape[0], -1, self.d_model))
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, self.d_model))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.d_model)), x], axis=1)
    pos = self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
    x = nn.LayerNorm(name="ln_f")(_blocks(self, x + pos, causal=False))
    x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
    return nn.Dense(self.num_classes, name="head")(x)


class GPT(_Transformer):
  """Decoder-only (GPT-style) language model over tokens (bytes: ``vocab=256``).

  Token embedding + learned positions (``context`` of them), ``depth`` causal
  pre-LayerNorm blocks, a final LayerNorm and the logits: ``embed.attend``
  (``tied=True``) or a dense ``head`` without bias. Input: int tokens
  (batch, T ≤ context); output: logits (batch, T, vocab).

  Attributes:
    vocab, context, tied; the widths of :class:`_Transformer` (``mlp_dim``
    256 here).
  """

  vocab: int = 256
  context: int = 128
  mlp_dim: int = 256
  tied: bool = True

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    del train
    embed = nn.Embed(self.vocab, self.d_model, name="embed")
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.d_model))
    x = embed(tokens) + pos[:tokens.shape[1]]
    x = nn.LayerNorm(name="ln_f")(_blocks(self, x, causal=True))
    if self.tied:
      return embed.attend(x)
    return nn.Dense(self.vocab, use_bias=False, name="head")(x)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "lenet5": LeNet5,
    "lenet3": LeNet3,
    "conv2": functools.partial(ConvN, features=(64, 64)),
    "conv4": functools.partial(ConvN, features=(64, 64, 128, 128)),
    "conv6": functools.partial(ConvN, features=(64, 64, 128, 128, 256, 256)),
    "resnet20": functools.partial(CifarResNet, blocks_per_stage=3),
    "resnet56": functools.partial(CifarResNet, blocks_per_stage=9),
    "vgg16": VGG,
    "resnet18": functools.partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock),
    "resnet34": functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock),
    "resnet50": functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3),
                                  block=BottleneckBlock),
    # 28×28×1 Fashion-MNIST: 7×7 patches of 4×4, d_model 64, 4 blocks of 4 heads.
    "vit": functools.partial(ViT, patch=4, d_model=64, depth=4, num_heads=4, head_dim=16,
                             mlp_dim=128),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
  """Returns the Flax module ``name`` (see :data:`MODEL_NAMES`).

  Args:
    name: e.g. ``"lenet5"``, ``"resnet20"``, ``"resnet18"``.
    num_classes: size of the output layer.
    **kwargs: module attributes, e.g. ``width=4`` for a thin ResNet in tests.

  Returns:
    A Linen module; call ``init(rng, x, train=False)`` and
    ``apply(variables, x, train=..., mutable=...)`` with NHWC ``x``.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


def has_batch_norm(variables: Any) -> bool:
  """Whether ``variables`` (from ``model.init``) has a ``batch_stats`` collection."""
  return bool(variables.get("batch_stats"))
