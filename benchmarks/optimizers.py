"""The optimizers compared, and the bytes one update of each must move.

Byte model (per leaf; p = parameter bytes, s = bytes of one state array):

- SGD-momentum reads W, g, b and writes W, b:            3p + 2s
- SplitLBI, penalized leaf: also reads/writes V and Γ:   3p + 6s
- SplitLBI lean (``store_gamma=False``): V only:         3p + 4s
- SplitLBI, unpenalized leaf: momentum SGD:              3p + 2s
- AdamW reads W, g, μ, ν and writes W, μ, ν:             3p + 4s
- SplitLBI with an Adam direction (``splitlbi_adam``): AdamW's traffic, and V and Γ
  on penalized leaves:                                    3p + 8s (unpenalized 3p + 4s)

These are the compulsory memory traffic of a fused, donated update: the
bandwidth bound is bytes / copy bandwidth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_splitlbi as osl
from optax_splitlbi.penalties import resolve_penalties

LR = 0.1


def make(name: str) -> optax.GradientTransformation:
  """Optimizer by name: sgd, adamw, splitlbi, splitlbi_lean, splitlbi_f32state,
  splitlbi_adam (``direction=optax.scale_by_adam()``, decoupled weight decay)."""
  if name == "sgd":
    return optax.sgd(LR, momentum=0.9)
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=1e-4)
  if name == "splitlbi":
    return osl.splitlbi(LR, kappa=1.0, nu=100.0, lam=1.0, momentum=0.9)
  if name == "splitlbi_lean":
    return osl.splitlbi(LR, kappa=1.0, nu=100.0, lam=1.0, momentum=0.9, store_gamma=False)
  if name == "splitlbi_adam":
    return osl.splitlbi(1e-3, kappa=1.0, nu=100.0, lam=1.0, weight_decay=1e-4,
                        direction=optax.scale_by_adam())
  if name == "splitlbi_f32state":
    return osl.splitlbi(LR, kappa=1.0, nu=100.0, lam=1.0, momentum=0.9,
                        state_dtype=jnp.float32)
  raise ValueError(f"unknown optimizer {name!r}")


def _nbytes(shape, dtype) -> int:
  return int(np.prod(shape)) * jnp.dtype(dtype).itemsize


def bytes_moved(name: str, params, state_dtype=None) -> int:
  """Compulsory bytes of one update + apply_updates of ``name`` on ``params``."""
  pens = None
  if name.startswith("splitlbi"):
    pen_tree = resolve_penalties(None, params)
    pens = jax.tree.structure(params).flatten_up_to(pen_tree)
  total = 0
  for i, x in enumerate(jax.tree.leaves(params)):
    p = _nbytes(x.shape, x.dtype)
    s = _nbytes(x.shape, state_dtype or x.dtype)
    if name == "sgd":
      total += 3 * p + 2 * s
    elif name == "adamw":
      total += 3 * p + 4 * s
    elif name in ("splitlbi", "splitlbi_f32state"):
      total += 3 * p + (6 if pens[i] is not None else 2) * s
    elif name == "splitlbi_lean":
      total += 3 * p + (4 if pens[i] is not None else 2) * s
    elif name == "splitlbi_adam":
      total += 3 * p + (8 if pens[i] is not None else 4) * s
    else:
      raise ValueError(name)
  return total


def update_step(opt: optax.GradientTransformation):
  """jit(params, state, grads) -> (params', state'), params and state donated."""

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))
