"""Weight initialisations compared by the sensitivity study, as ``init_from`` snapshots.

``project``: the models as defined in :mod:`examples.models` (conv kernels He
normal over fan-out as the paper's PyTorch code, dense kernels Flax's default
LeCun normal); ``flax``: Flax's default LeCun normal (variance 1/fan_in,
truncated) on every kernel; ``he``: He normal (variance 2/fan_in, truncated,
``flax.linen.initializers.he_normal``) on every kernel. Biases stay zero.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from examples import models
from examples.configs.base import Config

SCHEMES = {
    "project": None,
    "flax": nn.initializers.lecun_normal(),
    "he": nn.initializers.he_normal(),
}


def init_params(config: Config, scheme: str, image_shape: tuple[int, int, int],
                num_classes: int = 10) -> dict[str, np.ndarray]:
  """The flat ``{"params/<path>": array}`` initial weights of ``config``'s model.

  The ``project`` scheme equals the trainer's own initialisation for
  ``config.seed``; the others redraw every kernel (ndim ≥ 2) from the scheme's
  initializer with a key derived from the seed and the leaf's position.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"init scheme must be one of {sorted(SCHEMES)}, got {scheme!r}.")
  model = models.get_model(config.model, num_classes, **dict(config.model_kwargs))
  rng = jax.random.key(config.seed, impl=config.prng_impl)
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  if jax.tree.leaves(variables.get("batch_stats", {})):
    raise ValueError(f"init schemes support models without BatchNorm, not {config.model!r}.")
  leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  init = SCHEMES[scheme]
  flat = {}
  for i, (path, leaf) in enumerate(leaves):
    if init is not None and leaf.ndim >= 2:
      leaf = init(jax.random.fold_in(jax.random.key(config.seed), i), leaf.shape, leaf.dtype)
    flat["params/" + jax.tree_util.keystr(path, simple=True, separator="/")] = np.asarray(leaf)
  return flat


def write_init(config: Config, scheme: str, path: str,
               image_shape: tuple[int, int, int] = (28, 28, 1)) -> Config:
  """Writes the scheme's initial weights to ``path``; ``config`` starting from them."""
  if SCHEMES.get(scheme, 0) is None:
    return config
  flat = init_params(config, scheme, image_shape)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  np.savez(path, **flat)
  return config.replace(init_from=path)
