"""The train step and the eval step of every example: the trainer
(:mod:`examples.train`), :mod:`examples.multi_device`, the studies and the
benchmarks build theirs here and jit them their own way (donation, shardings).

A model is anything with Linen's ``apply(variables, images, train=...)``; it has
BatchNorm when the state's ``batch_stats`` has leaves (``{}`` otherwise).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import optax_splitlbi as slbi


class TrainState(NamedTuple):
  """What a train step reads and writes (all donated)."""

  params: Any
  batch_stats: Any
  opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(model, tx: optax.GradientTransformation):
  """One optimizer step on a batch, not yet jitted.

  Args:
    model: the network (Linen-style ``apply``).
    tx: the optimizer; for a fixed subnetwork chain
      :func:`optax_splitlbi.masked_updates` into it, or pass ``masks``.

  Returns:
    ``step(state, batch, masks=None) -> (state, {"loss", "accuracy"})``:
    ``batch`` holds ``"image"`` and ``"label"``; ``masks`` (boolean, params
    structure) zero the gradient outside a subnetwork and the weights after
    the update.
  """

  def step(state: TrainState, batch: dict, masks: Any = None):
    has_bn = bool(jax.tree.leaves(state.batch_stats))

    def loss_fn(params):
      if has_bn:
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                      batch["image"], train=True, mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
      else:
        logits = model.apply({"params": params}, batch["image"], train=True)
        new_stats = state.batch_stats
      return jnp.mean(cross_entropy(logits, batch["label"])), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if masks is not None:  # a fixed subnet: no gradient, no weight outside it
      grads = slbi.apply_masks(grads, masks)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if masks is not None:
      params = slbi.apply_masks(params, masks)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return TrainState(params, new_stats, opt_state), {"loss": loss, "accuracy": acc}

  return step


def make_eval_step(model):
  """Test-set sums of one batch, not yet jitted.

  Args:
    model: the network (Linen-style ``apply``).

  Returns:
    ``eval(params, batch_stats, batch) -> {"correct", "loss", "count"}``, sums
    over the examples whose ``batch["mask"]`` is 1 (padding has 0).
  """

  def step(params, batch_stats, batch):
    variables = {"params": params}
    if jax.tree.leaves(batch_stats):
      variables["batch_stats"] = batch_stats
    logits = model.apply(variables, batch["image"], train=False)
    m = batch["mask"]
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * m),
            "loss": jnp.sum(cross_entropy(logits, batch["label"]) * m),
            "count": jnp.sum(m)}

  return step
