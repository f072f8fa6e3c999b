r"""One training loop for every run of the paper: SplitLBI or an optax baseline.

Usage (the command line is :mod:`examples.main`)::

    python -m examples.train                      # SplitLBI on sklearn digits (~1 min)
    python -m examples.train --config digits_sgd  # the SGD (Mom-Wd) baseline
    python -m examples.train --config resnet20_cifar10 --workdir workdirs/r20 \
        --set data_dir=~/tensorflow_datasets
    python -m examples.train --list               # every named config

:func:`train_and_evaluate` is the loop: set up, restore, then per epoch train,
evaluate the dense model W, run the epoch hooks, record, checkpoint. The run
modes are data, not branches in the loop:

- SplitLBI: the hooks evaluate the sparse model W on supp Γ
  (:func:`optax_splitlbi.sparse_params`, paper Sec. 4) and report per-layer
  sparsity; recorders write per-filter norms and supp Γ at chosen epochs;
- a fixed mask (``mask_from``, lottery retraining): the optimizer is
  ``optax.chain(tx, optax_splitlbi.masked_updates(masks))``, and a hook
  reports the mask's density;
- ``retrain_slim``: the model is the slim architecture of ``mask_from``;
- an optax baseline: no hooks.

With ``--workdir`` a run writes (:mod:`examples.outputs`) ``metrics.jsonl`` /
``metrics.csv``, ``norms.npz`` (Fig. 1 solution path), ``checkpoints/``
(rerunning resumes from the latest), ``masks/`` and ``snapshots/``, and
``python -m examples.plots WORKDIR`` draws them. The steps are in
:mod:`examples.train_steps`, the printed lines and the slim summary in
:mod:`examples.reports`.

Data parallelism: the train step is ``jax.jit``-compiled over a 1-D
``jax.make_mesh`` of all devices; batches are sharded along ``"data"``, and each
process loads only its slice of every global batch (``jax.process_index``), so
the same code runs on one CPU, 8 GPUs or a multi-host pod. Parameters and
optimizer state are replicated (``param_sharding="replicated"``) or, with
``--set param_sharding=fsdp``, kernels and their b, V, Γ are split over the
same axis on their output filters / neurons (:mod:`examples.distributed`).
Params, BatchNorm statistics and the optimizer state are donated to the step.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_splitlbi as slbi
from examples import distributed, input_pipeline, models, outputs, reports, train_steps
from examples.configs.base import Config
from examples.train_steps import TrainState

EpochHook = Callable[[TrainState], dict]  # state -> entries of the epoch's row


# ----------------------------------------------------------------------- optimizer


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """The paper's step schedules, in optimizer steps, with an optional linear warm-up.

  ``step``: ×``decay_factor`` every ``decay_every`` epochs (Table 1);
  ``multistep``: ×``decay_factor`` at each epoch of ``milestones`` (80/120 of
  160, Tables 2-5 and the lottery retraining); ``constant``. With
  ``warmup_steps = w > 0`` step t runs at ``min(1, (t + 1) / w)`` times that rate
  (the decay epochs do not move).
  """
  base = _decay_schedule(config, steps_per_epoch)
  w = config.warmup_steps
  if w < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {w}.")
  if w == 0:
    return base
  return lambda count: base(count) * jnp.minimum(1.0, (count + 1) / w)


def _decay_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "step":
    return optax.exponential_decay(lr, config.decay_every * steps_per_epoch,
                                   config.decay_factor, staircase=True)
  if config.schedule == "multistep":
    return optax.piecewise_constant_schedule(
        lr, {int(m) * steps_per_epoch: config.decay_factor for m in config.milestones})
  raise ValueError(f"schedule must be constant, step or multistep, got {config.schedule!r}.")


def make_penalty(config: Config, model=None, image_shape: Optional[tuple] = None):
  """The SplitLBI penalty of ``config.penalty``.

  ``"group"``: group lasso on conv filters + lasso on dense kernels (paper
  Sec. 3); ``"lasso"``: lasso on both (Fig. 5 c-d); ``"channels"``: groups
  that span layers, one per channel slimming can remove (a residual channel
  across the stem, every block's last conv and the projection, each with its
  BatchNorm scale and shift; :func:`optax_splitlbi.channel_groups`, needs
  ``model`` and ``image_shape``) at λ = ``conv_lam``, lasso (``fc_lam``) on
  the dense kernels outside them. Biases and BatchNorm scales are otherwise
  not penalized.
  """
  conv_lam, fc_lam = config.conv_lam, config.fc_lam  # None: the optimizer's lam
  if config.penalty not in ("group", "lasso", "channels"):
    raise ValueError(f"penalty must be 'group', 'lasso' or 'channels', got {config.penalty!r}.")

  def spec(path, leaf):
    del path
    if leaf.ndim == 4:
      if config.penalty == "lasso":
        return slbi.Lasso(conv_lam)
      return slbi.conv_filters(conv_lam, config.normalized)
    if leaf.ndim == 2:
      return slbi.Lasso(fc_lam)
    return None

  if config.penalty != "channels":
    return spec
  if model is None or image_shape is None:
    raise ValueError("penalty='channels' traces the model: pass model= and image_shape=.")
  x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  return slbi.channel_groups(lambda v, x: model.apply(v, x, train=False), variables, x,
                             members=config.group_members, lam=conv_lam,
                             normalized=config.normalized, rest=spec,
                             attached=config.group_attached)


def make_optimizer(config: Config, steps_per_epoch: int, model=None,
                   image_shape: Optional[tuple] = None) -> optax.GradientTransformation:
  """SplitLBI (with its κ, ν, λ) or an optax baseline, by ``config.optimizer``
  (``model`` and ``image_shape``: for ``penalty="channels"``)."""
  schedule = make_schedule(config, steps_per_epoch)
  if config.optimizer == "splitlbi":
    return slbi.splitlbi(
        schedule, kappa=config.kappa, nu=config.nu, lam=config.lam, momentum=config.momentum,
        nesterov=config.nesterov, weight_decay=config.weight_decay,
        penalty=make_penalty(config, model, image_shape), coupling=config.coupling,
        direction=_direction(config))
  if config.optimizer == "sgd":
    # PyTorch semantics: decay (every parameter) is added to the gradient first.
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay) if config.weight_decay else optax.identity(),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
  if config.optimizer == "adam":
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay) if config.weight_decay else optax.identity(),
        optax.adam(schedule))
  if config.optimizer == "adamw":  # decoupled weight decay
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  raise ValueError(f"optimizer must be splitlbi, sgd, adam or adamw, got {config.optimizer!r}.")


def _direction(config: Config) -> Optional[optax.GradientTransformation]:
  """SplitLBI's W direction: the paper's momentum, or Adam's m̂/(√v̂ + ε) (AdaBreg-style)."""
  if config.direction == "momentum":
    return None
  if config.direction == "adam":
    return optax.scale_by_adam()
  raise ValueError(f"direction must be 'momentum' or 'adam', got {config.direction!r}.")


# ------------------------------------------------------------------------- the loop


def train_and_evaluate(config: Config, workdir: Optional[str] = None, *,
                       verbose: bool = True) -> dict:
  """Trains ``config``; returns the last epoch's metrics plus ``history``.

  Args:
    config: the run (see :mod:`examples.configs`).
    workdir: where metrics, norms, checkpoints, masks and snapshots go; an
      existing checkpoint there is resumed. ``None``: nothing is written.
    verbose: print per-epoch lines and the final sparsity table.

  Returns:
    ``{"epoch", "train_loss", "train_accuracy", "test_accuracy", "test_loss",
    "sparse_test_accuracy", "weight_density", "group_density", "sparsity",
    "history": [...], "slim", "state"}`` (sparse entries and ``slim`` only for
    SplitLBI or masked runs).
  """
  say = print if verbose and jax.process_index() == 0 else _silent
  workdir = outputs.prepare_workdir(config, workdir)
  mesh = _data_mesh(config)
  batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  data = _datasets(config)
  model = models.get_model(config.model, data.info.num_classes, **dict(config.model_kwargs))
  if config.retrain_slim:  # the slim architecture of mask_from, trained from scratch
    model = reports.slim_architecture(config, model, data.info.image_shape)
  state, tx, masks = create_train_state(config, model, data, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step = jax.jit(train_steps.make_train_step(model, tx), donate_argnums=(0,),
                       out_shardings=(shardings, replicated))
  evaluator = functools.partial(_evaluate, data=data, config=config, batch_sharding=batch_sharding)
  evaluate = functools.partial(evaluator, jax.jit(train_steps.make_eval_step(model),
                                                  out_shardings=replicated))
  schedule = make_schedule(config, data.steps_per_epoch)
  hooks = epoch_hooks(config, evaluate, shardings.params, masks)

  ckpt = outputs.checkpoint_manager(workdir, config.keep_checkpoints)
  state, start_epoch = outputs.restore(ckpt, state)
  if start_epoch:
    say(f"Resumed from {workdir}/checkpoints at epoch {start_epoch}.")
  log = outputs.MetricsLog(workdir, start_epoch)
  recorders = file_recorders(config, workdir, start_epoch)
  for record in recorders if start_epoch == 0 else ():
    record(0, state)  # the initial weights, norms (Γ₀ = 0), supp Γ₀
  say(reports.header(config, data.info, data.steps_per_epoch, mesh.size))
  result: dict = {}
  for epoch in range(start_epoch + 1, config.epochs + 1):
    t0 = time.time()
    state, train = train_epoch(train_step, state, data, config, epoch, batch_sharding)
    test_accuracy, test_loss = evaluate(state.params, state.batch_stats)
    row = {"epoch": epoch, "lr": float(schedule(epoch * data.steps_per_epoch - 1)),
           "train_loss": train["loss"], "train_accuracy": train["accuracy"],
           "test_loss": test_loss, "test_accuracy": test_accuracy}
    for hook in hooks:  # sparse evaluation, densities
      row.update(hook(state))
    report = row.pop("sparsity", None)  # the per-layer table: for the result, not the log
    row["epoch_time_s"] = time.time() - t0
    log.write(row)
    for record in recorders:  # norms, snapshots
      record(epoch, state)
    if ckpt is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
      outputs.save_checkpoint(ckpt, state, epoch)
    say(reports.epoch_line(row))
    result = dict(row, sparsity=report)
  if ckpt is not None:
    ckpt.close()

  if not result and log.rows:  # already trained: report the logged last epoch
    result = dict(log.rows[-1], sparsity=None)
  result["history"] = list(log.rows)
  if verbose and (summary := reports.final(config.name, result)):
    say(summary)
  subnetwork = slbi.support(state.opt_state) if config.optimizer == "splitlbi" else masks
  if config.slim and subnetwork is not None and "test_accuracy" in result:
    result["slim"] = _slim(model, state, subnetwork, evaluator, data, config, result, say)
  result["state"] = state
  return result


# ------------------------------------------------------------------------ the pieces


class Data(NamedTuple):
  """A run's datasets and how many train steps make an epoch."""

  train: Any
  eval: Any
  info: Any
  steps_per_epoch: int


def _silent(*args, **kwargs) -> None:
  del args, kwargs


def _data_mesh(config: Config) -> jax.sharding.Mesh:
  """One ``"data"`` axis over all (or ``num_devices``) devices; checks the batch sizes."""
  mesh = distributed.data_mesh(config.num_devices)
  for what, bs in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size)):
    if bs % mesh.size:
      raise ValueError(f"{what}={bs} must be divisible by the {mesh.size} devices.")
  return mesh


def _datasets(config: Config) -> Data:
  """The train and test sets of ``config`` and its steps per epoch."""
  train_ds, eval_ds, info = input_pipeline.create_datasets(
      config.dataset, data_dir=config.data_dir and os.path.expanduser(config.data_dir),
      image_size=config.image_size, seed=config.seed, augment=config.augment,
      train_examples=config.train_examples)
  steps_per_epoch = train_ds.steps_per_epoch(config.batch_size)
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {info.num_train} "
                     "training examples.")
  return Data(train_ds, eval_ds, info, steps_per_epoch)


def _init_rng(config: Config) -> jax.Array:
  # rbg: XLA:CPU compiles threefry samplers slowly (ResNet init 16 s → 2 s).
  return jax.random.key(config.seed, impl=config.prng_impl)


def create_train_state(config: Config, model, data: Data, mesh: jax.sharding.Mesh):
  """The optimizer and the initial train state of a run, laid out on ``mesh``.

  Fresh weights of ``config.seed``, or ``init_from``'s; with ``mask_from``
  (unless ``retrain_slim``) the weights outside the mask are zeroed and the
  optimizer keeps them zero (:func:`optax_splitlbi.masked_updates`).

  Returns:
    ``(state, tx, masks)``; ``masks`` (NumPy, params structure) is ``None``
    without a fixed mask.
  """
  image_shape = data.info.image_shape
  tx = make_optimizer(config, data.steps_per_epoch, model, image_shape)
  init_variables = lambda rng: model.init(rng, jnp.zeros((1, *image_shape), jnp.float32),
                                          train=False)
  masks = None
  if config.mask_from and not config.retrain_slim:
    abstract = jax.eval_shape(init_variables, _init_rng(config))["params"]
    masks = outputs.load_masks(os.path.expanduser(config.mask_from), abstract)
    tx = optax.chain(tx, slbi.masked_updates(masks))

  def init(rng):
    variables = init_variables(rng)
    return TrainState(variables["params"], variables.get("batch_stats", {}),
                      tx.init(variables["params"]))

  shardings = distributed.tree_shardings(jax.eval_shape(init, _init_rng(config)), mesh,
                                         config.param_sharding)
  state = jax.jit(init, out_shardings=shardings)(_init_rng(config))
  # A state from given params: b, V, Γ laid out like them (also across hosts).
  state_from = jax.jit(lambda p, s: TrainState(p, s, tx.init(p)), out_shardings=shardings)
  if config.init_from:
    state = state_from(*outputs.load_snapshot(os.path.expanduser(config.init_from),
                                              state.params, state.batch_stats))
  if masks is not None:
    masked = jax.tree.map(lambda x, m: x if m is None else x * m.astype(x.dtype),
                          state.params, masks, is_leaf=lambda x: x is None)
    state = state_from(masked, state.batch_stats)
  return state, tx, masks


def epoch_hooks(config: Config, evaluate: Callable, params_sharding: Any,
                masks: Any) -> list[EpochHook]:
  """What a run adds to each epoch's row after the dense evaluation.

  SplitLBI: the test accuracy and loss of W on supp Γ and the sparsity of
  supp Γ; a fixed mask: its density; an optax baseline: nothing. A
  ``"sparsity"`` entry is the per-layer report (kept out of the logged row).
  """
  if config.optimizer == "splitlbi":
    sparse_params = jax.jit(slbi.sparse_params, out_shardings=params_sharding)

    def sparse_evaluation(state: TrainState) -> dict:
      acc, loss = evaluate(sparse_params(state.params, state.opt_state), state.batch_stats)
      return {"sparse_test_accuracy": acc, "sparse_test_loss": loss}

    def support_sparsity(state: TrainState) -> dict:
      return reports.densities(
          slbi.sparsity_report(*distributed.fetch((state.opt_state, state.params))))

    return [sparse_evaluation, support_sparsity]
  if masks is not None:
    kept = {k: v for k, v in outputs.flat(masks).items() if v is not None}
    return [lambda state: reports.densities(reports.mask_sparsity_report(kept, state.params))]
  return []


def file_recorders(config: Config, workdir: Optional[str],
                   start_epoch: int) -> list[outputs.Recorder]:
  """What a run writes after each epoch (and for epoch 0): snapshots of the
  weights at ``save_params_at``; for SplitLBI supp Γ at ``save_masks_at`` and
  the per-filter norms (``record_norms``). Nothing without a workdir."""
  if not workdir:
    return []
  recorders = [outputs.params_snapshots(workdir, config.save_params_at)]
  if config.optimizer == "splitlbi":
    recorders.append(outputs.support_snapshots(workdir, config.save_masks_at))
    if config.record_norms:
      recorders.append(outputs.NormsFile(workdir, start_epoch))
  return recorders


def _to_global(sharding: NamedSharding, batch: dict) -> dict:
  """This process's rows of a batch as one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def train_epoch(train_step: Callable, state: TrainState, data: Data, config: Config,
                epoch: int, batch_sharding: NamedSharding) -> tuple[TrainState, dict]:
  """One epoch of train steps (a progress bar on a terminal).

  Returns:
    The new state and the epoch's mean training ``{"loss", "accuracy"}``.
  """
  n = data.steps_per_epoch
  batches = data.train.train_batches(config.batch_size, epoch, max_steps=n,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  bar = None
  if config.progress and sys.stderr.isatty():
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=n, desc=f"epoch {epoch}/{config.epochs}", leave=False)
  sums = None
  for batch in batches:
    state, m = train_step(state, _to_global(batch_sharding, batch))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    if bar is not None:
      bar.update()
  if bar is not None:
    bar.close()
  return state, {k: float(v) / n for k, v in jax.device_get(sums).items()}


def _evaluate(eval_step: Callable, params: Any, batch_stats: Any, *, data: Data, config: Config,
              batch_sharding: NamedSharding) -> tuple[float, float]:
  """``(accuracy, loss)`` of ``eval_step`` on the test set (``eval_examples`` of it)."""
  tot = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in data.eval.eval_batches(config.eval_batch_size, process_index=jax.process_index(),
                                      process_count=jax.process_count(),
                                      max_examples=config.eval_examples):
    out = jax.device_get(eval_step(params, batch_stats, _to_global(batch_sharding, batch)))
    tot = {k: tot[k] + float(out[k]) for k in tot}
  return tot["correct"] / tot["count"], tot["loss"] / tot["count"]


def _slim(model, state: TrainState, masks: Any, evaluator: Callable, data: Data,
          config: Config, result: dict, say: Callable) -> dict:
  """:func:`examples.reports.slim_and_evaluate` of the final model on ``masks``
  (``evaluator(eval_step, params, batch_stats)``: :func:`_evaluate` on the test set)."""
  sample = next(data.eval.eval_batches(config.eval_batch_size, process_index=jax.process_index(),
                                       process_count=jax.process_count()))["image"]
  return reports.slim_and_evaluate(
      model, state, masks, sample,
      lambda m, v: evaluator(jax.jit(train_steps.make_eval_step(m)), v["params"],
                             v.get("batch_stats", {})), result, say)


# ------------------------------------------------------------- the command line


def parse_args(argv: Optional[Sequence[str]] = None):
  """:func:`examples.main.parse_args` (kept here for ``python -m examples.train``)."""
  from examples import main as main_lib  # pylint: disable=import-outside-toplevel
  return main_lib.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """:func:`examples.main.main`, the documented ``python -m examples.train``."""
  from examples import main as main_lib  # pylint: disable=import-outside-toplevel
  return main_lib.main(argv)


if __name__ == "__main__":
  main()
