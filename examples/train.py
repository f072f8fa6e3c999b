r"""One training loop for every run of the paper: SplitLBI or an optax baseline.

Usage::

    python -m examples.train                      # SplitLBI on sklearn digits (~1 min)
    python -m examples.train --config digits_sgd  # the SGD (Mom-Wd) baseline
    python -m examples.train --config resnet20_cifar10 --workdir workdirs/r20 \
        --set data_dir=~/tensorflow_datasets
    python -m examples.train --list               # every named config

Per epoch the loop evaluates the dense model W and, for SplitLBI, the sparse
model W on supp Γ (:func:`optax_splitlbi.sparse_params`, paper Sec. 4) and
reports per-layer sparsity. With ``--workdir`` it writes

- ``metrics.jsonl`` / ``metrics.csv``: one row per epoch,
- ``norms.npz``: per-filter norms of Γ and W each epoch (Fig. 1 solution path),
- ``checkpoints/``: orbax checkpoints; rerunning resumes from the latest,
- ``masks/`` and ``snapshots/``: supp Γ and weights at chosen epochs (lottery),

and ``python -m examples.plots WORKDIR`` draws them.

Data parallelism: the train step is ``jax.jit``-compiled over a 1-D
``jax.make_mesh`` of all devices; batches are sharded along ``"data"``, and each
process loads only its slice of every global batch (``jax.process_index``), so
the same code runs on one CPU, 8 GPUs or a multi-host pod. Parameters and
optimizer state are replicated (``param_sharding="replicated"``) or, with
``--set param_sharding=fsdp``, kernels and their b, V, Γ are split over the
same axis on their output filters / neurons (:mod:`examples.distributed`).
Params, BatchNorm statistics and the optimizer state are donated to the step.

Several processes (one per host): the flags ``--coordinator HOST:PORT
--num_processes N --process_id I`` (or ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; or ``--multihost`` for SLURM / Cloud
TPU / GKE auto-detection) start this as one process of a job; see
docs/scaling.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_splitlbi as slbi
from optax_splitlbi.penalties import path_str
from examples import configs as configs_lib
from examples import distributed, input_pipeline, models
from examples.configs.base import Config


class TrainState(NamedTuple):
  """What a train step reads and writes (all donated)."""

  params: Any
  batch_stats: Any
  opt_state: Any


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


# ------------------------------------------------------------------------- sparsity


def _flat(tree: Any) -> dict[str, Any]:
  """``{"Conv_0/kernel": leaf}`` for a (params-structured) tree; ``None`` leaves kept."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {path_str(p): v for p, v in leaves}


def _flat_like(structure: Any, tree: Any) -> dict[str, Any]:
  """``tree`` (params-structured, may hold static / ``None`` leaves) keyed by the
  paths of ``structure`` (e.g. the momentum buffers, which have every leaf)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(structure)
  return {path_str(p): v for (p, _), v in zip(paths, treedef.flatten_up_to(tree))}


sparsity_report = slbi.sparsity_report
format_report = slbi.format_report


def mask_sparsity_report(masks: dict[str, np.ndarray]) -> dict:
  """Per-layer density of fixed 0/1 masks (lottery retraining)."""
  layers = {}
  for name, m in masks.items():
    nz = int(np.count_nonzero(m))
    layers[name] = dict(kind="mask", weights=int(m.size), nonzero_weights=nz,
                        weight_density=nz / m.size, groups=int(m.size), nonzero_groups=nz,
                        group_density=nz / m.size)
  w = sum(v["weights"] for v in layers.values())
  nzw = sum(v["nonzero_weights"] for v in layers.values())
  total = dict(weights=w, nonzero_weights=nzw, weight_density=nzw / max(w, 1), groups=w,
               nonzero_groups=nzw, group_density=nzw / max(w, 1))
  return {"layers": layers, "total": total}


def filter_norms(opt_state: Any, params: Any) -> dict[str, np.ndarray]:
  """Per-group norms ‖Γ_g‖ and ‖W_g‖ of every group-penalized leaf (Fig. 1 path)."""
  state = slbi.find_state(opt_state)
  pens = _flat_like(state.momentum, state.penalty)
  norms = {kind: _flat_like(state.momentum, slbi.group_norms_tree(tree, state, keepdims=False))
           for kind, tree in (("gamma", slbi.gamma(state)), ("weight", params))}
  return {f"{kind}/{name}": np.asarray(norms[kind][name])
          for name, pe in pens.items() if pe is not None and pe.kind == "group"
          for kind in ("gamma", "weight")}


# --------------------------------------------------------------------- train / eval


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(model, tx: optax.GradientTransformation, has_bn: bool):
  """``step(state, batch, masks) -> (state, metrics)``; ``masks`` (or None) fix a subnet."""

  def step(state: TrainState, batch: dict, masks: Any):
    def loss_fn(params):
      variables = {"params": params}
      if has_bn:
        variables["batch_stats"] = state.batch_stats
        logits, updates = model.apply(variables, batch["image"], train=True,
                                      mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
      else:
        logits, new_stats = model.apply(variables, batch["image"], train=True), state.batch_stats
      loss = jnp.mean(cross_entropy(logits, batch["label"]))
      return loss, (logits, new_stats)

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


def make_eval_step(model, has_bn: bool):
  """``eval(params, batch_stats, batch) -> {"correct", "loss", "count"}`` (sums)."""

  def step(params, batch_stats, batch):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = batch_stats
    logits = model.apply(variables, batch["image"], train=False)
    m = batch["mask"]
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * m),
            "loss": jnp.sum(cross_entropy(logits, batch["label"]) * m),
            "count": jnp.sum(m)}

  return step


def save_npz(path: str, flat: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)


def load_masks(path: str, params: Any) -> Any:
  """Masks (params structure, ``None`` where the file has no entry) from an .npz."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"mask_from: {path!r} does not exist (write it with a "
                            "search run's save_masks_at).")
  with np.load(path) as f:
    stored = dict(f)
  flat = _flat(params)
  unknown = set(stored) - set(flat)
  if unknown:
    raise ValueError(f"mask_from: {path!r} has masks for unknown leaves {sorted(unknown)}.")
  for k, m in stored.items():
    if m.shape != flat[k].shape:
      raise ValueError(f"mask_from: mask {k!r} has shape {m.shape}, parameter {flat[k].shape}.")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return treedef.unflatten([stored.get(path_str(p)) for p, _ in leaves])


def load_snapshot(path: str, params: Any, batch_stats: Any) -> tuple[Any, Any]:
  """Weights (and BatchNorm statistics) of a snapshot .npz, checked against the model."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from: {path!r} does not exist (write it with a "
                            "search run's save_params_at).")
  with np.load(path) as f:
    stored = dict(f)
  out = []
  for prefix, tree in (("params", params), ("batch_stats", batch_stats)):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    new = []
    for p, x in leaves:
      key = f"{prefix}/{path_str(p)}"
      if key not in stored or stored[key].shape != x.shape:
        raise ValueError(f"init_from: {path!r} lacks {key!r} with shape {x.shape}.")
      new.append(jnp.asarray(stored[key], x.dtype))
    out.append(treedef.unflatten(new))
  return out[0], out[1]


def _is_tty() -> bool:
  return sys.stderr.isatty()


class _Logger:
  """Appends per-epoch metrics to metrics.jsonl and metrics.csv (process 0 only)."""

  def __init__(self, workdir: Optional[str], resume_epoch: int):
    self.workdir = workdir if jax.process_index() == 0 else None
    self.rows: list[dict] = []
    if self.workdir and os.path.exists(self._path("jsonl")):
      with open(self._path("jsonl")) as f:
        self.rows = [r for r in map(json.loads, f) if r["epoch"] <= resume_epoch]
      self._rewrite()

  def _path(self, ext):
    return os.path.join(self.workdir, f"metrics.{ext}")

  def _rewrite(self):
    with open(self._path("jsonl"), "w") as f:
      for r in self.rows:
        f.write(json.dumps(r) + "\n")
    keys = list(dict.fromkeys(k for r in self.rows for k in r))
    with open(self._path("csv"), "w", newline="") as f:
      w = csv.DictWriter(f, keys)
      w.writeheader()
      w.writerows(self.rows)

  def log(self, row: dict):
    self.rows.append(row)
    if self.workdir:
      self._rewrite()


def _checkpoint_manager(workdir: str, config: Config):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))


class _Run(NamedTuple):
  """What the training loop's helpers share: the run's config, devices, data,
  model, optimizer and jitted steps (everything but the train state)."""

  config: Config
  workdir: Optional[str]
  say: Callable[..., None]
  pid: int
  pcount: int
  n_dev: int
  data_sharding: NamedSharding
  replicated: NamedSharding
  shardings: TrainState
  train_ds: Any
  eval_ds: Any
  info: Any
  steps_per_epoch: int
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  is_slbi: bool
  has_bn: bool
  train_step: Callable
  eval_step: Callable
  sparse_fn: Callable


def _prepare_workdir(config: Config, workdir: Optional[str]) -> Optional[str]:
  """The absolute ``workdir`` (created, with config.json from process 0), or ``None``."""
  if workdir:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
  return workdir


def _devices(config: Config) -> jax.sharding.Mesh:
  """One ``"data"`` axis over all (or ``num_devices``) devices; checks the batch sizes."""
  mesh = distributed.data_mesh(config.num_devices)
  for what, bs in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size)):
    if bs % mesh.size:
      raise ValueError(f"{what}={bs} must be divisible by the {mesh.size} devices.")
  return mesh


def _datasets(config: Config) -> tuple[Any, Any, Any, int]:
  """``(train_ds, eval_ds, info, steps_per_epoch)``."""
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
  return train_ds, eval_ds, info, steps_per_epoch


def _init_fn(model, tx: optax.GradientTransformation, image_shape: tuple):
  """``init(rng) -> TrainState`` of freshly initialised weights."""

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    return TrainState(params, stats, tx.init(params))

  return init


def _init_rng(config: Config) -> jax.Array:
  # rbg: XLA:CPU compiles threefry samplers slowly (ResNet init 16 s → 2 s).
  return jax.random.key(config.seed, impl=config.prng_impl)


def _setup(config: Config, workdir: Optional[str], say: Callable[..., None]) -> _Run:
  """Devices, data, model, optimizer, state layout and the jitted steps of a run."""
  mesh = _devices(config)
  replicated = NamedSharding(mesh, P())
  train_ds, eval_ds, info, steps_per_epoch = _datasets(config)
  model = models.get_model(config.model, info.num_classes, **dict(config.model_kwargs))
  if config.retrain_slim:
    model = slim_architecture(config, model, info.image_shape)
  tx = make_optimizer(config, steps_per_epoch, model, info.image_shape)
  abstract = jax.eval_shape(_init_fn(model, tx, info.image_shape), _init_rng(config))
  shardings = distributed.tree_shardings(abstract, mesh, config.param_sharding)
  has_bn = bool(jax.tree.leaves(abstract.batch_stats))
  return _Run(
      config=config, workdir=workdir, say=say, pid=jax.process_index(),
      pcount=jax.process_count(), n_dev=mesh.size,
      data_sharding=NamedSharding(mesh, P("data")), replicated=replicated,
      shardings=shardings, train_ds=train_ds, eval_ds=eval_ds, info=info,
      steps_per_epoch=steps_per_epoch, model=model, tx=tx,
      schedule=make_schedule(config, steps_per_epoch),
      is_slbi=config.optimizer == "splitlbi", has_bn=has_bn,
      train_step=jax.jit(make_train_step(model, tx, has_bn), donate_argnums=(0,),
                         out_shardings=(shardings, replicated)),
      eval_step=jax.jit(make_eval_step(model, has_bn), out_shardings=replicated),
      sparse_fn=jax.jit(slbi.sparse_params, out_shardings=shardings.params))


def _initial_state(run: _Run) -> tuple[TrainState, Any]:
  """The initial train state (``init_from`` weights, ``mask_from`` applied) and the
  fixed masks (``None`` unless ``mask_from`` without ``retrain_slim``)."""
  config = run.config
  init = _init_fn(run.model, run.tx, run.info.image_shape)
  state = jax.jit(init, out_shardings=run.shardings)(_init_rng(config))
  # A state from given params: b, V, Γ laid out like them (also across hosts).
  state_from = jax.jit(lambda p, s: TrainState(p, s, run.tx.init(p)),
                       out_shardings=run.shardings)
  if config.init_from:
    params, stats = load_snapshot(os.path.expanduser(config.init_from), state.params,
                                  state.batch_stats)
    state = state_from(params, stats)
  masks = None
  if config.mask_from and not config.retrain_slim:
    masks = jax.device_put(load_masks(os.path.expanduser(config.mask_from), state.params),
                           run.replicated)
    masked = jax.tree.map(lambda x, m: x if m is None else x * m.astype(x.dtype),
                          state.params, masks, is_leaf=lambda x: x is None)
    state = state_from(masked, state.batch_stats)
  return state, masks


def _resume(run: _Run, ckpt, state: TrainState) -> tuple[TrainState, int]:
  """The latest checkpoint (in this run's layout) and its epoch; else ``(state, 0)``."""
  if ckpt is None or ckpt.latest_step() is None:
    return state, 0
  import orbax.checkpoint as ocp
  start_epoch = int(ckpt.latest_step())
  abstract = jax.tree.map(  # this run's layout, whatever the writer's was
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = ckpt.restore(start_epoch, args=ocp.args.StandardRestore(abstract))
  run.say(f"Resumed from {run.workdir}/checkpoints at epoch {start_epoch}.")
  return TrainState(*restored), start_epoch


def _norms_path(run: _Run) -> Optional[str]:
  return os.path.join(run.workdir, "norms.npz") if run.workdir else None


def _load_norm_rows(run: _Run, start_epoch: int) -> dict[str, list]:
  """The recorded per-filter norms of epochs ``0..start_epoch`` (when resuming)."""
  path = _norms_path(run)
  if path and os.path.exists(path) and start_epoch > 0:
    with np.load(path) as f:
      return {k: list(v[:start_epoch + 1]) for k, v in f.items()}
  return {}


def _to_global(run: _Run, batch: dict) -> dict:
  return {k: jax.make_array_from_process_local_data(run.data_sharding, v)
          for k, v in batch.items()}


def _evaluate(run: _Run, params, batch_stats, step=None) -> tuple[float, float]:
  """``(accuracy, loss)`` on the test set (``step``: the run's eval step by default)."""
  step = run.eval_step if step is None else step
  config = run.config
  tot = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in run.eval_ds.eval_batches(config.eval_batch_size, process_index=run.pid,
                                        process_count=run.pcount,
                                        max_examples=config.eval_examples):
    out = jax.device_get(step(params, batch_stats, _to_global(run, batch)))
    tot = {k: tot[k] + float(out[k]) for k in tot}
  return tot["correct"] / tot["count"], tot["loss"] / tot["count"]


def _snapshot(run: _Run, state: TrainState, epoch: int) -> None:
  """Weights and supp Γ at the chosen epochs: every process gathers, process 0 writes."""
  config, workdir = run.config, run.workdir
  if not workdir:
    return
  if epoch in config.save_params_at:
    params, stats = distributed.fetch((state.params, state.batch_stats))
    flat = {f"params/{k}": v for k, v in _flat(params).items()}
    flat.update({f"batch_stats/{k}": v for k, v in _flat(stats).items()})
    if run.pid == 0:
      save_npz(os.path.join(workdir, "snapshots", f"epoch_{epoch:04d}.npz"), flat)
  if epoch in config.save_masks_at and run.is_slbi:
    sup = {k: v for k, v in _flat(distributed.fetch(slbi.support(state.opt_state))).items()
           if v is not None}
    if run.pid == 0:
      save_npz(os.path.join(workdir, "masks", f"epoch_{epoch:04d}.npz"), sup)


def _record_norms(run: _Run, state: TrainState, norm_rows: dict[str, list]) -> None:
  """Appends this epoch's per-filter norms to ``norm_rows`` (process 0 writes them)."""
  if not (run.is_slbi and run.config.record_norms):
    return
  for k, v in filter_norms(*distributed.fetch((state.opt_state, state.params))).items():
    norm_rows.setdefault(k, []).append(v)
  path = _norms_path(run)
  if path and run.pid == 0:
    save_npz(path, {k: np.stack(v) for k, v in norm_rows.items()})


def _train_epoch(run: _Run, state: TrainState, masks: Any,
                 epoch: int) -> tuple[TrainState, dict[str, float]]:
  """One epoch of train steps; returns the state and the mean loss and accuracy."""
  config, steps = run.config, run.steps_per_epoch
  batches = run.train_ds.train_batches(config.batch_size, epoch, max_steps=steps,
                                       process_index=run.pid, process_count=run.pcount)
  bar = None
  if config.progress and _is_tty():
    from tqdm import tqdm
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", leave=False)
  sums = None
  for batch in batches:
    state, m = run.train_step(state, _to_global(run, batch), masks)
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    if bar is not None:
      bar.update()
  if bar is not None:
    bar.close()
  return state, {k: float(v) / steps for k, v in jax.device_get(sums).items()}


def _epoch_metrics(run: _Run, state: TrainState, masks: Any, epoch: int,
                   train_metrics: dict[str, float]) -> tuple[dict, Optional[dict]]:
  """The epoch's row (dense and sparse test metrics, densities) and sparsity report."""
  acc, loss = _evaluate(run, state.params, state.batch_stats)
  row = {"epoch": epoch, "lr": float(run.schedule(epoch * run.steps_per_epoch - 1)),
         "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
         "test_loss": loss, "test_accuracy": acc}
  report = None
  if run.is_slbi:
    sparse = run.sparse_fn(state.params, state.opt_state)
    row["sparse_test_accuracy"], row["sparse_test_loss"] = _evaluate(run, sparse,
                                                                     state.batch_stats)
    report = sparsity_report(*distributed.fetch((state.opt_state, state.params)))
  elif masks is not None:
    report = mask_sparsity_report({k: np.asarray(v) for k, v in
                                   _flat(jax.device_get(masks)).items() if v is not None})
  if report is not None:
    row["weight_density"] = report["total"]["weight_density"]
    row["group_density"] = report["total"]["group_density"]
    row["layer_density"] = {k: v["weight_density"] for k, v in report["layers"].items()}
  return row, report


def _save_checkpoint(run: _Run, ckpt, state: TrainState, epoch: int) -> None:
  """Every ``checkpoint_every`` epochs and at the last one (with a workdir)."""
  config = run.config
  if ckpt is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
    import orbax.checkpoint as ocp
    ckpt.save(epoch, args=ocp.args.StandardSave(state))
    ckpt.wait_until_finished()


def _epoch_line(row: dict) -> str:
  """The line printed after each epoch."""
  line = (f"epoch {row['epoch']:3d}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
          f"acc {row['train_accuracy']:.2%}  test acc {row['test_accuracy']:.2%}")
  if "sparse_test_accuracy" in row:
    line += (f"  sparse acc {row['sparse_test_accuracy']:.2%}  weights kept "
             f"{row['weight_density']:.1%}  groups kept {row['group_density']:.1%}")
  return line + f"  ({row['epoch_time_s']:.1f}s)"


def _run_epoch(run: _Run, state: TrainState, masks: Any, epoch: int, logger: _Logger,
               norm_rows: dict[str, list], ckpt) -> tuple[TrainState, dict]:
  """Trains, evaluates, logs, records and checkpoints one epoch.

  Returns:
    The new state and the epoch's result (its row plus ``sparsity``).
  """
  t0 = time.time()
  state, train_metrics = _train_epoch(run, state, masks, epoch)
  row, report = _epoch_metrics(run, state, masks, epoch, train_metrics)
  row["epoch_time_s"] = time.time() - t0
  logger.log(row)
  _record_norms(run, state, norm_rows)
  _snapshot(run, state, epoch)
  _save_checkpoint(run, ckpt, state, epoch)
  run.say(_epoch_line(row))
  return state, dict(row, sparsity=report)


def _say_header(run: _Run) -> None:
  config, info = run.config, run.info
  run.say(f"{config.name}: {config.description}\n  model {config.model} on {info.name} "
          f"({info.num_train} train / {info.num_eval} test, {info.image_shape}), optimizer "
          f"{config.optimizer}, {config.epochs} epochs × {run.steps_per_epoch} steps, batch "
          f"{config.batch_size} on {run.n_dev} device(s)")


def _say_final(run: _Run, result: dict, verbose: bool) -> None:
  """The final accuracies and, for sparse runs, the per-layer sparsity table."""
  say, name = run.say, run.config.name
  if verbose and result.get("sparsity") is not None:
    say(f"\nFinal ({name}): dense W test accuracy {result['test_accuracy']:.2%}"
        + (f", sparse W on supp Γ {result['sparse_test_accuracy']:.2%}"
           if "sparse_test_accuracy" in result else ""))
    say("Per-layer sparsity (nonzero / total):")
    say(format_report(result["sparsity"]))
  elif verbose and "test_accuracy" in result:
    say(f"\nFinal ({name}): test accuracy {result['test_accuracy']:.2%}")


def _slim(run: _Run, state: TrainState, masks: Any, result: dict) -> dict:
  """:func:`slim_and_evaluate` of the final model (supp Γ or the fixed masks)."""
  config = run.config
  sample = next(run.eval_ds.eval_batches(config.eval_batch_size, process_index=run.pid,
                                         process_count=run.pcount))["image"]
  return slim_and_evaluate(
      run.model, state, slbi.support(state.opt_state) if run.is_slbi else masks, sample,
      lambda m, v: _evaluate(run, v["params"], v.get("batch_stats", {}),
                             jax.jit(make_eval_step(m, run.has_bn))), result, run.say)


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
    "history": [...]}`` (sparse entries only for SplitLBI or masked runs).
  """
  say = print if verbose and jax.process_index() == 0 else (lambda *a, **k: None)
  workdir = _prepare_workdir(config, workdir)
  run = _setup(config, workdir, say)
  state, masks = _initial_state(run)
  ckpt = _checkpoint_manager(workdir, config) if workdir else None
  state, start_epoch = _resume(run, ckpt, state)
  logger = _Logger(workdir, start_epoch)
  norm_rows = _load_norm_rows(run, start_epoch)
  if start_epoch == 0:
    _snapshot(run, state, 0)
    _record_norms(run, state, norm_rows)
  _say_header(run)
  result: dict = {}
  for epoch in range(start_epoch + 1, config.epochs + 1):
    state, result = _run_epoch(run, state, masks, epoch, logger, norm_rows, ckpt)
  if ckpt is not None:
    ckpt.close()
  if not result and logger.rows:  # already trained: report the logged last epoch
    result = dict(logger.rows[-1], sparsity=None)
  result["history"] = list(logger.rows)
  _say_final(run, result, verbose)
  if config.slim and (run.is_slbi or masks is not None) and "test_accuracy" in result:
    result["slim"] = _slim(run, state, masks, result)
  result["state"] = state
  return result


# ------------------------------------------------------------------------ slimming


def slim_architecture(config: Config, model, image_shape: tuple):
  """The slim module of ``config.mask_from`` (for ``retrain_slim``).

  The channels the mask prunes everywhere are removed
  (:func:`optax_splitlbi.slim_linen`); the run then trains this smaller
  architecture from a fresh initialisation.
  """
  if not config.mask_from:
    raise ValueError("retrain_slim needs mask_from (a search run's masks/epoch_XXXX.npz).")
  if config.init_from:
    raise ValueError("retrain_slim trains the slim architecture from scratch; unset "
                     "init_from (--set init_from=None).")
  x = jnp.zeros((2, *image_shape), jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(config.seed, impl=config.prng_impl), x,
                                         train=False))()
  masks = load_masks(os.path.expanduser(config.mask_from), variables["params"])
  return slbi.slim_linen(model, variables, masks, x, count_flops=False, verify=False,
                         train=False).module


def slim_and_evaluate(model, state: TrainState, masks: Any, sample: np.ndarray,
                      evaluate_model, result: dict, say=print) -> dict:
  """Slims the final model (W on ``masks``), evaluates it, and prints parameters,
  FLOPs per example and test accuracy of the dense, masked and slim networks.

  Args:
    model, state: the trained Linen model and its train state.
    masks: supp Γ (SplitLBI) or the run's fixed mask.
    sample: an input batch (constant folding, verification, FLOPs).
    evaluate_model: ``(module, variables) -> (accuracy, loss)`` on the test set.
    result: the run's final metrics (dense / masked accuracies).
    say: where the table goes.

  Returns:
    ``{"rows": {name: (parameters, FLOPs per example, accuracy)}, "report",
    "module", "variables"}``, or ``{"error": message}`` when the masks cannot be
    slimmed (e.g. supp Γ is still empty in some layer).
  """
  params, stats, masks = distributed.fetch((state.params, state.batch_stats, masks))
  variables = {"params": params, **({"batch_stats": stats} if jax.tree.leaves(stats) else {})}
  try:
    res = slbi.slim_linen(model, variables, masks, sample, train=False)
  except ValueError as e:
    say(f"\nSlimming skipped: {e}")
    return {"error": str(e)}
  acc, _ = evaluate_model(res.module, res.variables)
  rep, n = res.report, sample.shape[0]
  dense_acc = result["test_accuracy"] if "sparse_test_accuracy" in result else None
  masked_acc = result.get("sparse_test_accuracy", result["test_accuracy"])
  rows = {"dense": (rep["params"]["dense"], rep["flops"]["dense"] / n, dense_acc),
          "masked": (rep["params"]["masked"], rep["flops"]["dense"] / n, masked_acc),
          "slim": (rep["params"]["slim"], rep["flops"]["slim"] / n, acc)}
  summary = {"rows": rows, "report": rep, "module": res.module, "variables": res.variables}
  say(format_slim_summary(summary))
  return summary


def format_slim_summary(summary: dict) -> str:
  """The dense / masked / slim table printed at the end of a run."""
  lines = ["\nSlim network (pruned channels removed; docs/slimming.md):",
           f"  {'model':<8} {'parameters':>11} {'FLOPs/example':>14} {'test accuracy':>14}"]
  for name, (params, flops, acc) in summary["rows"].items():
    acc_s = "-" if acc is None else f"{acc:.2%}"
    note = "  (zeros are still multiplied)" if name == "masked" else ""
    lines.append(f"  {name:<8} {params:>11,} {flops / 1e6:>12.3f} M {acc_s:>14}{note}")
  widths = [f"{k.split('/')[-2]} {v['groups']}→{v['groups'] - v['removed']}"
            for k, v in summary["report"]["layers"].items()]
  inexact = [f for f in summary["report"]["folds"] if not f["exact"]]
  lines.append("  widths: " + ", ".join(widths))
  if inexact:
    lines.append(f"  {len(inexact)} inexact fold(s) at zero-padded convs, max error "
                 f"{max(f['max_error'] for f in inexact):.3g} (--set slim=False to skip)")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m examples.train",
      description=("Train a network with SplitLBI (or an optax baseline) as in Fu et al., "
                   "'Exploring Structural Sparsity of Deep Networks via Inverse Scale "
                   "Spaces'. Without arguments: SplitLBI on scikit-learn's digits (no "
                   "download, about a minute on a laptop CPU)."),
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=("examples:\n"
              "  python -m examples.train                       # digits, SplitLBI\n"
              "  python -m examples.train --config digits_sgd   # SGD (Mom-Wd) baseline\n"
              "  python -m examples.train --config lenet_mnist --workdir runs/lenet \\\n"
              "      --set data_dir=~/tensorflow_datasets epochs=20\n"
              "  python -m examples.train --config lenet_mnist --set dataset=idx:~/mnist\n"
              "  python -m examples.plots runs/lenet            # PNG plots\n"
              "Datasets are never downloaded; see docs/examples.md."))
  parser.add_argument("--config", default="digits",
                      help="named config (default: digits); --list shows them all")
  parser.add_argument("--workdir", default=None,
                      help="directory for metrics, norms, checkpoints (resumes if present)")
  parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                      help="override config fields, e.g. --set epochs=3 nu=100 optimizer=sgd")
  parser.add_argument("--list", action="store_true", help="list the named configs and exit")
  parser.add_argument("--show", action="store_true", help="print the resolved config and exit")
  parser.add_argument("--quiet", action="store_true", help="only the final summary")
  distributed.add_flags(parser)
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Command-line entry point; returns the final metrics (see ``train_and_evaluate``)."""
  args = parse_args(argv)
  if args.list:
    for name, cfg in configs_lib.all_configs().items():
      print(f"{name:<38} {cfg.description}")
    return {}
  config = configs_lib.apply_overrides(configs_lib.get_config(args.config), args.set)
  if args.show:
    for f in dataclasses.fields(config):
      print(f"{f.name} = {getattr(config, f.name)!r}")
    return {}
  distributed.initialize(distributed.options_from_args(args))  # before any JAX backend use
  try:
    return train_and_evaluate(config, args.workdir, verbose=not args.quiet)
  except input_pipeline.DatasetNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()
