"""A decoder-only (GPT-style) byte / character language model in Flax NNX.

``GPT(rngs=nnx.Rngs(0))(tokens)`` maps int tokens (batch, T ≤ context) to logits
(batch, T, vocab): token embedding + learned positions, ``depth`` causal
pre-LayerNorm blocks (grouped-query attention + GELU MLP), a final LayerNorm,
tied (``embed.attend``) or untied logits. The Linen twins are
:class:`examples.models.GPT` and :class:`examples.models.ViT`; the attention is
:func:`examples.models.attend` (heads as tensor axes, GQA by an einsum over the
query groups), so :func:`optax_splitlbi.slim_nnx` removes query heads, key /
value heads (with their query group) and MLP neurons. Every layer reads its
sizes from its parameters' shapes at call time, so a slimmed copy (different
heads / widths per block) runs as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from examples.models import attend, sized

# Flax's default LeCun normal; zeros for a zero-size kernel (a block slimmed to no
# heads / neurons, where variance scaling would divide by zero).
_KERNEL_INIT = sized(nnx.initializers.lecun_normal())


class Attention(nnx.Module):
  """Causal self-attention with ``num_kv_heads`` key / value heads (GQA).

  Projections ``query`` (d, H, D), ``key`` / ``value`` (d, K, D), ``out``
  (H, D, d) are ``nnx.LinearGeneral``; the head counts are their kernels' shapes.
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, num_kv_heads: int, *,
               causal: bool = True, rngs: nnx.Rngs):
    lin = functools.partial(nnx.LinearGeneral, kernel_init=_KERNEL_INIT, rngs=rngs)
    self.query = lin(d_model, (num_heads, head_dim))
    self.key = lin(d_model, (num_kv_heads, head_dim))
    self.value = lin(d_model, (num_kv_heads, head_dim))
    self.out = lin((num_heads, head_dim), d_model, axis=(-2, -1))
    self.causal = causal

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(attend(self.query(x), self.key(x), self.value(x), self.causal))


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp_out(gelu(mlp_in(ln2(x))))``."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, num_kv_heads: int,
               mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = Attention(d_model, num_heads, head_dim, num_kv_heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, mlp_dim, kernel_init=_KERNEL_INIT, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, d_model, kernel_init=_KERNEL_INIT, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


def _per_block(value, depth: int) -> tuple:
  """An int for every block, or a per-block sequence checked for length."""
  if isinstance(value, int):
    return (value,) * depth
  if len(value) != depth:
    raise ValueError(f"GPT: {len(value)} per-block widths for {depth} blocks.")
  return tuple(int(v) for v in value)


class GPT(nnx.Module):
  """Decoder-only transformer over ``vocab`` tokens (256: bytes).

  Args:
    vocab: token count (the embedding's rows and the logits).
    context: the longest sequence (learned positions).
    d_model: the residual stream's width.
    depth: blocks.
    num_heads: query heads, an int or one per block.
    head_dim: width of a head.
    mlp_dim: MLP hidden width, an int or one per block.
    num_kv_heads: key / value heads (GQA), an int or one per block, dividing
      ``num_heads``; ``None``: ``num_heads`` (multi-head attention).
    tied: logits ``embed.attend(x)``; else a ``head`` ``Linear`` without bias.
    rngs: the initialisation keys.
  """

  def __init__(self, vocab: int = 256, context: int = 128, d_model: int = 64,
               depth: int = 4, num_heads: int | Sequence[int] = 4, head_dim: int = 16,
               mlp_dim: int | Sequence[int] = 256,
               num_kv_heads: Optional[int | Sequence[int]] = None, tied: bool = True, *,
               rngs: nnx.Rngs):
    heads = _per_block(num_heads, depth)
    kv = heads if num_kv_heads is None else _per_block(num_kv_heads, depth)
    mlp = _per_block(mlp_dim, depth)
    self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, d_model)))
    self.blocks = nnx.List([Block(d_model, h, head_dim, k, m, rngs=rngs)
                            for h, k, m in zip(heads, kv, mlp)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = None if tied else nnx.Linear(d_model, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[...][:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    x = self.ln_f(x)
    return self.embed.attend(x) if self.head is None else self.head(x)


def count_params(model: nnx.Module) -> int:
  """The number of parameters (``nnx.Param`` entries) of ``model``."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
