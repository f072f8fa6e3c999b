"""Control masks for the lottery study, at the per-layer density of a reference mask.

A *filter* layer is a 4-D (HWIO) conv kernel under the group-lasso penalty: its
reference mask keeps whole output filters, and so do the controls. Every other
layer keeps single weights. Masks are flat ``{"Conv_0/kernel": bool array}``
dicts, the format of the trainer's ``masks/epoch_XXXX.npz`` files.
"""

from __future__ import annotations

import numpy as np


def kept_filters(mask: np.ndarray) -> np.ndarray:
  """(O,) bool: which output filters of an HWIO mask keep any weight."""
  return mask.reshape(-1, mask.shape[-1]).any(axis=0)


def _filter_mask(keep: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  return np.broadcast_to(keep, shape).copy()


def _top(scores: np.ndarray, k: int) -> np.ndarray:
  """Bool mask of the k largest scores (ties: the earlier index first)."""
  keep = np.zeros(scores.size, bool)
  if k > 0:
    order = np.argsort(-scores.ravel(), kind="stable")
    keep[order[:k]] = True
  return keep.reshape(scores.shape)


def random_masks(reference: dict[str, np.ndarray], filter_layers: set[str],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Uniformly random masks keeping as many filters / weights per layer as ``reference``."""
  out = {}
  for name, ref in reference.items():
    if name in filter_layers:
      keep = kept_filters(ref)
      out[name] = _filter_mask(_top(rng.random(keep.size), int(keep.sum())), ref.shape)
    else:
      out[name] = _top(rng.random(ref.shape), int(ref.sum()))
  return out


def magnitude_masks(reference: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                    filter_layers: set[str]) -> dict[str, np.ndarray]:
  """One-shot magnitude pruning (Frankle & Carbin 2019) to ``reference``'s per-layer counts.

  Filter layers keep the filters of largest ℓ2 norm, the others the weights of
  largest absolute value, layer by layer.

  Raises:
    ValueError: a layer of ``reference`` missing from ``weights`` or of another shape.
  """
  out = {}
  for name, ref in reference.items():
    w = weights.get(name)
    if w is None or w.shape != ref.shape:
      raise ValueError(f"magnitude_masks: weights[{name!r}] is "
                       f"{None if w is None else w.shape}, the mask {ref.shape}.")
    if name in filter_layers:
      norms = np.sqrt((w.reshape(-1, w.shape[-1]).astype(np.float64) ** 2).sum(0))
      out[name] = _filter_mask(_top(norms, int(kept_filters(ref).sum())), ref.shape)
    else:
      out[name] = _top(np.abs(w.astype(np.float64)), int(ref.sum()))
  return out


def layer_densities(masks: dict[str, np.ndarray]) -> dict[str, float]:
  return {k: float(np.count_nonzero(m)) / m.size for k, m in masks.items()}


def total_density(masks: dict[str, np.ndarray]) -> float:
  return sum(int(np.count_nonzero(m)) for m in masks.values()) / sum(
      m.size for m in masks.values())
