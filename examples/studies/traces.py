"""Short runs that record the training loss of every step (stability sweeps).

:func:`examples.train.train_and_evaluate` logs per-epoch means; whether a run
blows up shows in the first few dozen steps, so the sensitivity study trains
with the same pieces (data, model, optimizer, train step) but keeps each step's
loss. The compiled step is shared by runs that differ only in seed or initial
weights.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from examples import input_pipeline, models, outputs, train, train_steps
from examples.configs.base import Config

# A run is dead when its test accuracy is below this (chance is 0.1) or a loss
# is not finite: the ReLU network has collapsed to a constant prediction.
DEAD_ACCURACY = 0.2


@functools.lru_cache(maxsize=8)
def _compiled(config: Config, steps_per_epoch: int, num_classes: int):
  """(model, tx, jitted train step, jitted eval step) of a config (seed-free)."""
  model = models.get_model(config.model, num_classes, **dict(config.model_kwargs))
  tx = train.make_optimizer(config, steps_per_epoch)
  step = jax.jit(train_steps.make_train_step(model, tx))
  evaluate = jax.jit(train_steps.make_eval_step(model))
  return model, tx, step, evaluate


def _initial_state(config: Config, model, tx, image_shape) -> train_steps.TrainState:
  rng = jax.random.key(config.seed, impl=config.prng_impl)
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  if jax.tree.leaves(variables.get("batch_stats", {})):
    raise ValueError(f"trace runs support models without BatchNorm, not {config.model!r}.")
  params = variables["params"]
  if config.init_from:
    params, _ = outputs.load_snapshot(config.init_from, params, {})
  return train_steps.TrainState(params, {}, tx.init(params))


def _accuracy(evaluate, params, eval_ds, config: Config) -> float:
  correct = count = 0.0
  for batch in eval_ds.eval_batches(config.eval_batch_size, max_examples=config.eval_examples):
    out = jax.device_get(evaluate(params, {}, batch))
    correct, count = correct + float(out["correct"]), count + float(out["count"])
  return correct / count


def trace_run(config: Config, run_dir: Optional[str] = None) -> dict[str, Any]:
  """Trains ``config.epochs × max_steps_per_epoch`` steps; every step's loss.

  Returns:
    ``{"losses": [...], "max_loss", "dead", "history": [{"epoch",
    "train_loss" (mean of the last 20 steps), "test_accuracy"}]}``.
  """
  del run_dir
  train_ds, eval_ds, info = input_pipeline.create_datasets(
      config.dataset, data_dir=config.data_dir, seed=config.seed, augment=config.augment,
      train_examples=config.train_examples)
  steps_per_epoch = train_ds.steps_per_epoch(config.batch_size)
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  key = config.replace(seed=0, init_from=None, name="", description="")
  model, tx, step, evaluate = _compiled(key, steps_per_epoch, info.num_classes)
  state = _initial_state(config, model, tx, info.image_shape)
  losses = []
  for epoch in range(1, config.epochs + 1):
    for batch in train_ds.train_batches(config.batch_size, epoch, max_steps=steps_per_epoch):
      state, metrics = step(state, batch, None)
      losses.append(metrics["loss"])
  losses = [float(x) for x in jax.device_get(losses)]
  acc = _accuracy(evaluate, state.params, eval_ds, config)
  finite = all(math.isfinite(x) for x in losses)
  return {"losses": losses,
          "max_loss": max(losses) if finite else float("inf"),
          "dead": (not finite) or acc < DEAD_ACCURACY,
          "history": [{"epoch": config.epochs, "test_accuracy": acc,
                       "train_loss": float(np.mean(losses[-20:]))}]}
