"""Study `groups` (issue 17): per-leaf filter groups against groups that span layers.

ResNet-20 on Fashion-MNIST padded to 32×32×3 (:func:`benchmarks.slim.cifar_shaped`),
SplitLBI with the lottery search settings (Nesterov, wd 1e-4, ν = 100, κ = 1,
α = 0.1, thresholds λ·√d, λ 1 on the classifier's lasso) shortened, with a
linear warm-up. Per seed, one run per penalty, each for the same steps:

- ``group``: one group per conv filter (``penalty=group``; BatchNorm not
  penalized), the paper's filter groups;
- ``channels``: one group per removable channel across layers
  (``penalty=channels``: :func:`optax_splitlbi.channel_groups`, producers,
  BatchNorm scale / shift attached).

Phases of a run:

1. *Search*, early-stopped at ``stops``: at each stop the dense W and W on
   supp Γ (no fine-tuning) are tested; the mask (supp Γ, a layer with no group
   in it keeps its next group to enter, so that no conv stack is cut in two) is
   fine-tuned ``finetune_steps`` SGD steps (momentum 0.9, wd 1e-4, the mask
   fixed) and tested, and slimmed (:func:`optax_splitlbi.slim_linen`: FLOPs,
   parameters, pruned filters kept back by residual coupling).
2. *Matched FLOPs*: from the last stop's entry order,
   ``prune_to_sparsity(scope="global")`` at ``densities`` (nested masks); each
   is tested (W on the mask) and slimmed.
3. *Latency*: the dense network and every slim network of the run at batch
   ``latency_batch`` on the CPU, interleaved round-robin (medians;
   :func:`benchmarks.common.interleaved`).

Two design decisions on the cheaper ``design_net`` (``design`` runs, search and
stops only): BatchNorm scale / shift in the channel's group (``group_attached``)
or only under its mask (then W on supp Γ is shown as is and with the BatchNorm
scale / shift of zero channels zeroed, :func:`zero_attached`), and the group
members (``producers`` or ``consumers``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optax_splitlbi as sl
from optax_splitlbi import masks as masks_lib
from optax_splitlbi.penalties import path_str
from examples.configs.base import Config
from examples.studies import common

METHODS = ("group", "channels")
METHOD_NAMES = {"group": "per-leaf filter groups", "channels": "cross-leaf channel groups"}
# Design variants: (group_members, group_attached).
VARIANTS = {"producers+bn": ("producers", True), "producers": ("producers", False),
            "consumers+bn": ("consumers", True)}
IMAGE_SHAPE = (32, 32, 3)
SAMPLE = 16  # images slimming traces, folds and counts FLOPs on (FLOPs are per image)


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 3
  net: str = "resnet20"
  model_kwargs: tuple = ()  # e.g. (("width", 2), ("blocks_per_stage", 1)) in smoke mode
  steps: int = 1200
  stops: tuple = (900, 1050, 1200)
  batch: int = 32
  warmup: int = 100
  lam: float = 0.05
  nu: float = 100.0
  finetune_steps: int = 150
  finetune_lr: float = 0.01
  densities: tuple = (0.5, 0.35)
  eval_examples: int = 2000
  latency_batch: int = 256
  rounds: int = 5
  design_net: str = "resnet20"
  design_seeds: int = 1
  design_steps: int = 1200
  design_stops: tuple = (1050, 1200)
  match_at: tuple = (1.5, 2.0, 2.5)  # FLOP reductions both penalties are compared at


SETTINGS = {"full": Settings(),
            "smoke": Settings(seeds=1, net="resnet20",
                              model_kwargs=(("width", 2), ("blocks_per_stage", 1)), steps=6,
                              stops=(3, 6), batch=8, warmup=2, lam=0.002, nu=1.0,
                              finetune_steps=2, densities=(0.3,), eval_examples=32,
                              latency_batch=8, rounds=1, design_seeds=1, design_steps=4,
                              design_stops=(4,), match_at=(1.1,))}


# ------------------------------------------------------------------------- data


def data_dir(dataset: str) -> str:
  """The IDX directory of ``dataset`` (``idx:<dir>``)."""
  if not dataset.startswith("idx:"):
    raise ValueError(f"study groups reads IDX files (--data idx:<dir>), got {dataset!r}.")
  return os.path.expanduser(dataset[4:])


def test_set(directory: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` test images as 32×32×3, normalised as ``cifar_shaped``; labels."""
  from examples import input_pipeline  # pylint: disable=g-import-not-at-top
  images = input_pipeline.read_idx(os.path.join(directory, "t10k-images-idx3-ubyte.gz"))[:n]
  labels = input_pipeline.read_idx(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))[:n]
  x = (images.astype(np.float32) / 255.0 - 0.286) / 0.353
  x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None].repeat(3, axis=-1)
  return x, labels.astype(np.int32)


# ----------------------------------------------------------------------- masks


def _flat(tree: Any) -> list:
  return jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)[0]


def filter_density(masks: Any) -> float:
  """The fraction of conv filters (output channels of 4-D kernels) a mask keeps."""
  kept = [np.asarray(m).any((0, 1, 2)) for m in _flat(masks)
          if m is not None and np.ndim(m) == 4]
  return float(sum(k.sum() for k in kept) / max(1, sum(k.size for k in kept)))


def complete(params: Any, opt_state: Any, masks: Any) -> tuple[Any, int]:
  """``masks`` where every unit (layer or cross-leaf class) that keeps no group keeps its
  most important one (``prune_to_sparsity`` order), so that no conv stack is cut in two
  (a layer without channels leaves a constant output), and dense kernels (the classifier) are kept whole; and the number of units
  completed."""
  leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(masks),
                                               is_leaf=lambda x: x is None)
  units = masks_lib.units(opt_state)
  kept = {}
  for u in units:
    m = np.asarray(leaves[u.leaves[0]])
    kept[u.name] = int(round(np.count_nonzero(m) * u.num_groups / m.size))
  # The classifier's lasso support is no channel structure: it stays whole (it can
  # otherwise drop the last rows some kept filter is read by, and slimming then has
  # nothing left of the last residual class).
  leaves = [None if m is not None and np.ndim(m) == 2 else m for m in leaves]
  empty = [u for u in units if kept[u.name] == 0 and leaves[u.leaves[0]] is not None]
  if not empty:
    return treedef.unflatten(leaves), 0
  target = {u.name: max(kept[u.name], 1) / u.num_groups for u in units}
  layer = _flat(jax.device_get(sl.prune_to_sparsity(params, opt_state, target, scope="layer")))
  for u in empty:
    for i in u.leaves:
      leaves[i] = np.asarray(layer[i])
  return treedef.unflatten(leaves), len(empty)


def zero_attached(params: Any, masks: Any, groups: sl.ChannelGroups) -> Any:
  """``params`` with the attached parameters (BatchNorm scale and shift) of every channel
  the masks prune zeroed too.

  Args:
    params: e.g. W on supp Γ of a run with ``channel_groups(..., attached=False)``.
    masks: its masks (kernels masked, BatchNorm parameters ``None``).
    groups: ``channel_groups(..., attached=True)`` of the same model: a class's members
      with a mask say which channels are pruned; its members without one are zeroed there.
  """
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat = {path_str(p): np.array(x) for p, x in paths}
  flat_masks = dict(zip((path_str(p) for p, _ in paths), _flat(masks)))
  for cls in groups.classes:
    masked = [(p, a) for p, a in cls.members if flat_masks.get(p) is not None]
    if not masked:
      continue
    p, a = masked[0]
    keep = np.moveaxis(np.asarray(flat_masks[p]), a, -1).reshape(-1, cls.size).any(0)
    for q, b in cls.members:
      if flat_masks.get(q) is None:
        index = [slice(None)] * flat[q].ndim
        index[b] = ~keep
        flat[q][tuple(index)] = 0
  return treedef.unflatten([flat[path_str(p)] for p, _ in paths])


# ------------------------------------------------------------------------- runs


class _Context:
  """What a run's phases share: settings, config, model, data, jitted functions and the
  slim networks to time."""

  def __init__(self, s: Settings, config: Config):
    from examples import models  # pylint: disable=g-import-not-at-top
    self.s, self.config, self.dir = s, config, data_dir(config.dataset)
    self.model = models.get_model(config.model, 10, **dict(config.model_kwargs))
    self.x_test, self.y_test = test_set(self.dir, s.eval_examples)
    self.sample = jnp.asarray(self.x_test[:SAMPLE])
    self._predict = jax.jit(lambda v, x: jnp.argmax(self.model.apply(v, x, train=False), -1))
    self._finetune = None
    self.slims: dict[str, tuple[Any, Any]] = {}

  def accuracy(self, params: Any, stats: Any) -> float:
    """Test accuracy (the first ``eval_examples`` images)."""
    v, correct = {"params": params, "batch_stats": stats}, 0
    for i in range(0, len(self.x_test), 500):
      pred = self._predict(v, jnp.asarray(self.x_test[i:i + 500]))
      correct += int(np.sum(np.asarray(pred) == self.y_test[i:i + 500]))
    return correct / len(self.x_test)

  def finetune(self, params: Any, stats: Any, masks: Any) -> tuple[Any, Any]:
    """``finetune_steps`` of SGD (momentum 0.9, wd 1e-4) on W ∘ masks, masks fixed."""
    from benchmarks.slim import cifar_shaped  # pylint: disable=g-import-not-at-top
    from examples import train, train_steps  # pylint: disable=g-import-not-at-top
    s, seed = self.s, self.config.seed
    tx = train.make_optimizer(Config(optimizer="sgd", learning_rate=s.finetune_lr,
                                     momentum=0.9, weight_decay=1e-4, schedule="constant"), 1)
    if self._finetune is None:
      self._finetune = (tx, jax.jit(train_steps.make_train_step(self.model, tx),
                                    donate_argnums=(0,)))
      self._ft_data = cifar_shaped(s.finetune_steps * s.batch, seed=10_000 + seed, data=self.dir)
    tx, step = self._finetune
    x, y = self._ft_data
    params = sl.apply_masks(params, masks)
    state = train_steps.TrainState(params, stats, tx.init(params))
    for i in range(s.finetune_steps):
      b = slice(i * s.batch, (i + 1) * s.batch)
      state, _ = step(state, {"image": x[b], "label": y[b]}, masks)
    return state.params, state.batch_stats

  def slim(self, name: str, params: Any, stats: Any, masks: Any, keep: bool = True) -> dict:
    """Slims W ∘ masks; FLOPs and parameters (dense, slim) and what was kept back."""
    res = sl.slim_linen(self.model, {"params": params, "batch_stats": stats}, masks,
                        self.sample, train=False)
    if keep:
      self.slims[name] = (res.module, res.variables)
    r, layers = res.report, res.report["layers"].values()
    return dict(flops_dense=r["flops"]["dense"] / SAMPLE, flops_slim=r["flops"]["slim"] / SAMPLE,
                params_dense=r["params"]["dense"], params_slim=r["params"]["slim"],
                pruned=sum(v["pruned"] for v in layers), removed=sum(v["removed"] for v in layers),
                kept_back=sum(v["kept_pruned"] for v in layers),
                inexact_folds=sum(not f["exact"] for f in r["folds"]),
                slim_error=r["max_abs_diff"] / max(1e-12, r["max_abs_output"]))

  def latency(self, params: Any, stats: Any) -> dict[str, float]:
    """Median CPU latency (s) of the dense network and every slim one, interleaved."""
    from benchmarks import common as bench  # pylint: disable=g-import-not-at-top
    from benchmarks.slim import Forward  # pylint: disable=g-import-not-at-top
    n = self.s.latency_batch
    x = jnp.asarray(np.random.default_rng(1).normal(size=(n, *IMAGE_SHAPE)), jnp.float32)
    fwd = {"dense": Forward(self.model, {"params": params, "batch_stats": stats}, x)}
    fwd.update({k: Forward(m, v, x) for k, (m, v) in self.slims.items()})
    times = bench.interleaved(fwd, rounds=self.s.rounds, warmup=1)
    return {k: float(np.median(v)) for k, v in times.items()}


def _optimizer(config: Config, model, steps: int):
  """SplitLBI of ``config`` (``examples.train``'s penalty and schedule), entry order kept."""
  from examples import train  # pylint: disable=g-import-not-at-top
  return sl.splitlbi(
      train.make_schedule(config, steps), kappa=config.kappa, nu=config.nu, lam=config.lam,
      momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay,
      penalty=train.make_penalty(config, model, IMAGE_SHAPE), coupling=config.coupling,
      record_path=True)


def search(ctx: _Context, steps: int, stops: tuple,
           on_stop: Callable[[int, Any], None]) -> list[float]:
  """Trains ``steps`` SplitLBI steps; ``on_stop(step, host_state)`` at each stop; the
  mean training loss of every 25 steps."""
  from benchmarks.slim import cifar_shaped  # pylint: disable=g-import-not-at-top
  from examples import train, train_steps  # pylint: disable=g-import-not-at-top
  config, model, batch = ctx.config, ctx.model, ctx.config.batch_size
  tx = _optimizer(config, model, steps)
  x, y = cifar_shaped(steps * batch, seed=config.seed, data=ctx.dir)
  variables = jax.jit(lambda: model.init(jax.random.key(config.seed, impl=config.prng_impl),
                                         x[:1], train=False))()
  state = train_steps.TrainState(variables["params"], variables["batch_stats"],
                           tx.init(variables["params"]))
  step = jax.jit(train_steps.make_train_step(model, tx), donate_argnums=(0,))
  losses, trace = [], []
  for i in range(1, steps + 1):
    b = slice((i - 1) * batch, i * batch)
    state, metrics = step(state, {"image": x[b], "label": y[b]}, None)
    losses.append(metrics["loss"])
    if i % 25 == 0 or i == steps:
      trace.append(float(np.mean(jax.device_get(losses))))
      losses = []
    if i in stops:
      on_stop(i, jax.device_get(state))
  return trace


def _run_config(s: Settings, dataset: str, seed: int, net: str, penalty: str, steps: int,
                members: str = "producers", attached: bool = True) -> Config:
  return Config(
      name=f"groups/{net}/{penalty}", dataset=dataset, model=net,
      model_kwargs=s.model_kwargs, optimizer="splitlbi",
      learning_rate=0.1, kappa=1.0, momentum=0.9, nesterov=True, weight_decay=1e-4, nu=s.nu,
      lam=s.lam, conv_lam=s.lam, fc_lam=1.0, normalized=True, penalty=penalty,
      group_members=members, group_attached=attached, schedule="constant",
      warmup_steps=s.warmup, epochs=1, max_steps_per_epoch=steps, batch_size=s.batch, seed=seed,
      eval_examples=s.eval_examples, progress=False, record_norms=False)


def _main_stop(ctx: _Context, step: int, state) -> dict:
  """Phase 1 at one stop: accuracies (dense, W on supp Γ, fine-tuned) and the slim net."""
  params, stats, opt = state
  support = jax.device_get(sl.support(opt))
  masks, completed = complete(params, opt, support)
  tuned = ctx.finetune(params, stats, masks)
  return dict(step=step, filters=filter_density(support), completed=completed,
              dense_acc=ctx.accuracy(params, stats),
              sparse_acc=ctx.accuracy(sl.sparse_params(params, opt), stats),
              acc=ctx.accuracy(sl.apply_masks(params, masks), stats),
              finetuned_acc=ctx.accuracy(*tuned), **ctx.slim(f"stop{step}", params, stats, masks))


def _matched(ctx: _Context, state) -> list[dict]:
  """Phase 2: nested global masks at ``densities`` from the entry order; W on each."""
  params, stats, opt = state
  rows = []
  for d in ctx.s.densities:
    masks, completed = complete(params, opt, sl.prune_to_sparsity(params, opt, d,
                                                                  scope="global"))
    rows.append(dict(density=d, filters=filter_density(masks), completed=completed,
                     acc=ctx.accuracy(sl.apply_masks(params, masks), stats),
                     **ctx.slim(f"d{d:g}", params, stats, masks)))
  return rows


def main_run(s: Settings, config: Config, run_dir) -> dict:
  """One seed of one penalty on ``s.net``: search with stops, matched FLOPs, latency."""
  del run_dir
  ctx, stops, last = _Context(s, config), [], {}

  def on_stop(step, state):
    stops.append(_main_stop(ctx, step, state))
    last["state"] = state

  trace = search(ctx, s.steps, tuple(s.stops), on_stop)
  matched = _matched(ctx, last["state"])
  latency = ctx.latency(last["state"].params, last["state"].batch_stats)
  for row in stops:
    row["latency"] = latency[f"stop{row['step']}"]
  for row in matched:
    row["latency"] = latency[f"d{row['density']:g}"]
  return {"loss_trace": trace, "stops": stops, "matched": matched,
          "dense_latency": latency["dense"]}


def design_run(s: Settings, config: Config, run_dir) -> dict:
  """One seed of one design variant on ``s.design_net``: the stops of phase 1, no
  fine-tuning or timing; for ``group_attached=False`` also W on supp Γ with the
  BatchNorm of zero channels zeroed (:func:`zero_attached`)."""
  del run_dir
  ctx, stops = _Context(s, config), []
  shapes = jax.eval_shape(lambda: ctx.model.init(jax.random.key(0), ctx.sample[:2],
                                                 train=False))
  attached = sl.channel_groups(lambda v, x: ctx.model.apply(v, x, train=False), shapes,
                               ctx.sample[:2], attached=True)

  def on_stop(step, state):
    params, stats, opt = state
    support = jax.device_get(sl.support(opt))
    sparse = sl.sparse_params(params, opt)
    row = dict(step=step, filters=filter_density(support),
               dense_acc=ctx.accuracy(params, stats), sparse_acc=ctx.accuracy(sparse, stats))
    if not config.group_attached:
      row["sparse_bn_acc"] = ctx.accuracy(zero_attached(sparse, support, attached), stats)
    masks, row["completed"] = complete(params, opt, support)
    row.update(ctx.slim(f"stop{step}", params, stats, masks, keep=False))
    stops.append(row)

  trace = search(ctx, s.design_steps, tuple(s.design_stops), on_stop)
  return {"loss_trace": trace, "stops": stops}


def runs(s: Settings, dataset: str) -> list[common.Run]:
  """Per seed: the two penalties on ``net``, then the design variants on ``design_net``."""
  out = []
  for seed in common.seeds_of(max(s.seeds, s.design_seeds)):
    if seed < s.seeds:
      out += [common.Run(f"main/{m}/seed{seed}", _run_config(s, dataset, seed, s.net, m, s.steps),
                         execute=functools.partial(main_run, s)) for m in METHODS]
    if seed < s.design_seeds:
      out += [common.Run(f"design/{name}/seed{seed}",
                         _run_config(s, dataset, seed, s.design_net, "channels", s.design_steps,
                                     members, attached),
                         execute=functools.partial(design_run, s))
              for name, (members, attached) in VARIANTS.items()]
  return out


# ----------------------------------------------------------------------- report


def _pct(values, digits: int = 1) -> str:
  return common.fmt(values, digits=digits)


def _num(values, digits: int = 2) -> str:
  return common.fmt(values, scale=1.0, digits=digits)


def _ratio(row: dict, key: str) -> float:
  if key == "flops":
    return row["flops_dense"] / row["flops_slim"]
  return row["dense_latency"] / row["latency"]


def _points(result: dict) -> list[dict]:
  """Every slim network of a main run: FLOP reduction, speed-up, latency, accuracy."""
  out = []
  for row in result["stops"] + result["matched"]:
    out.append(dict(flops=row["flops_dense"] / row["flops_slim"],
                    speedup=result["dense_latency"] / row["latency"], latency=row["latency"],
                    acc=row["acc"]))
  return sorted(out, key=lambda p: p["flops"])


def interpolate(points: list[dict], key: str, at: float) -> float:
  """``key`` at FLOP reduction ``at``, linear in log FLOP reduction between the points
  (NaN outside their range); speed-ups are interpolated in log too."""
  r = np.log([p["flops"] for p in points])
  v = np.array([p[key] for p in points], np.float64)
  if not len(r) or not r.min() <= math.log(at) <= r.max():
    return float("nan")
  logv = key in ("speedup", "latency")
  y = np.interp(math.log(at), r, np.log(v) if logv else v)
  return float(np.exp(y) if logv else y)


def _per_point(s: Settings, results: dict, key: str, count: int):
  """``(method, k, seed results, their k-th entries of key)`` for each method and k."""
  for method in METHODS:
    res = [results[f"main/{method}/seed{sd}"] for sd in common.seeds_of(s.seeds)]
    for k in range(count):
      yield method, k, res, [r[key][k] for r in res]


def _stop_table(s: Settings, results: dict) -> str:
  rows = []
  for method, k, res, st in _per_point(s, results, "stops", len(s.stops)):
    rows.append([METHOD_NAMES[method], s.stops[k], _pct([x["filters"] for x in st], 0),
                 _num([x["completed"] for x in st], 1), _pct([x["dense_acc"] for x in st]),
                 _pct([x["sparse_acc"] for x in st]), _pct([x["finetuned_acc"] for x in st]),
                 _num([_ratio(x, "flops") for x in st]),
                 _num([r["dense_latency"] / x["latency"] for r, x in zip(res, st)]),
                 _num([x["params_slim"] / 1e3 for x in st], 0),
                 _num([x["kept_back"] for x in st], 0), _num([x["inexact_folds"] for x in st], 0)])
  header = ["penalty", "stop (steps)", "filters in supp Γ (%)", "layers completed",
            "dense W (%)", "W on supp Γ (%)", f"fine-tuned {s.finetune_steps} steps (%)",
            "FLOP ÷", "CPU speed-up", "params slim (k)", "pruned filters kept back",
            "inexact folds"]
  return common.markdown_table(header, rows)


def _matched_points_table(s: Settings, results: dict) -> str:
  rows = []
  for method, k, res, ms in _per_point(s, results, "matched", len(s.densities)):
    rows.append([METHOD_NAMES[method], f"{s.densities[k]:g}", _pct([x["filters"] for x in ms], 0),
                 _num([_ratio(x, "flops") for x in ms]),
                 _num([r["dense_latency"] / x["latency"] for r, x in zip(res, ms)]),
                 _pct([x["acc"] for x in ms]), _num([x["kept_back"] for x in ms], 0)])
  header = ["penalty", "global density", "filters kept (%)", "FLOP ÷", "CPU speed-up",
            "W on mask, no fine-tuning (%)", "pruned filters kept back"]
  return common.markdown_table(header, rows)


def matched(s: Settings, results: dict) -> list[dict]:
  """Per FLOP reduction of ``match_at``: both methods' speed-ups and accuracies per seed
  (interpolated), the latency ratio per-leaf / cross-leaf and the goals."""
  out = []
  for at in s.match_at:
    row = {"at": at}
    for method in METHODS:
      pts = [_points(results[f"main/{method}/seed{sd}"]) for sd in common.seeds_of(s.seeds)]
      row[method] = {k: [interpolate(p, k, at) for p in pts] for k in ("speedup", "acc")}
    ratio = np.array(row["channels"]["speedup"]) / np.array(row["group"]["speedup"])
    dacc = np.array(row["channels"]["acc"]) - np.array(row["group"]["acc"])
    row.update(ratio=ratio.tolist(), dacc=dacc.tolist())
    sp = np.mean(row["channels"]["speedup"])
    row["goals"] = (bool(np.mean(ratio) >= 1.5), bool(sp >= 0.8 * at),
                    bool(abs(np.mean(dacc)) <= 0.01))
    out.append(row)
  return out


def _matched_table(rows: list[dict]) -> str:
  yes = lambda b: "yes" if b else "no"  # noqa: E731
  table = []
  for r in rows:
    if not np.all(np.isfinite(r["ratio"])):
      table.append([f"{r['at']:g}", "–", "–", "–", "–", "–", "–", "outside both ranges"])
      continue
    table.append([f"{r['at']:g}", _num(r["group"]["speedup"]), _num(r["channels"]["speedup"]),
                  _num(r["ratio"]), _pct(r["group"]["acc"]), _pct(r["channels"]["acc"]),
                  _num(np.array(r["dacc"]) * 100),
                  " / ".join(yes(g) for g in r["goals"])])
  header = ["FLOP ÷", "speed-up per-leaf", "speed-up cross-leaf",
            "latency per-leaf ÷ cross-leaf", "acc per-leaf (%)", "acc cross-leaf (%)",
            "Δ acc (points)", "goals: ≥ 1.5× / ≥ 0.8 × FLOP ÷ / |Δ| ≤ 1"]
  return common.markdown_table(header, table)


def _design_tables(s: Settings, results: dict) -> tuple[str, str]:
  """(a) BatchNorm in the group or only under the mask; (b) producers or consumers."""
  seeds = common.seeds_of(s.design_seeds)
  get = lambda v, k: [results[f"design/{v}/seed{sd}"]["stops"][k] for sd in seeds]  # noqa: E731
  bn, members = [], []
  for k, step in enumerate(s.design_stops):
    for v, label in (("producers+bn", "in the group (attached)"),
                     ("producers", "only under the mask")):
      st = get(v, k)
      zeroed = _pct([x["sparse_bn_acc"] for x in st]) if "sparse_bn_acc" in st[0] else "(same)"
      bn.append([label, step, _pct([x["filters"] for x in st], 0),
                 _pct([x["dense_acc"] for x in st]), _pct([x["sparse_acc"] for x in st]), zeroed,
                 _num([_ratio(x, "flops") for x in st]), _num([x["inexact_folds"] for x in st], 0)])
    for v in ("producers+bn", "consumers+bn"):
      st = get(v, k)
      members.append([v.split("+")[0], step, _pct([x["filters"] for x in st], 0),
                      _pct([x["dense_acc"] for x in st]), _pct([x["sparse_acc"] for x in st]),
                      _num([_ratio(x, "flops") for x in st]),
                      _num([x["flops_slim"] / 1e6 for x in st], 1),
                      _num([x["completed"] for x in st], 1)])
  bn_header = ["BatchNorm scale / shift", "stop (steps)", "filters in supp Γ (%)",
               "dense W (%)", "W on supp Γ (%)", "W on supp Γ, BN of zero channels zeroed (%)",
               "FLOP ÷", "inexact folds"]
  mem_header = ["members", "stop (steps)", "filters in supp Γ (%)", "dense W (%)",
                "W on supp Γ (%)", "FLOP ÷", "MFLOPs / image slim", "layers completed"]
  return (common.markdown_table(bn_header, bn), common.markdown_table(mem_header, members))


def plot(s: Settings, results: dict, target: str) -> str:
  """Latency and speed-up against FLOP reduction, every slim network of every seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.6))
  top = 1.0
  for method, color in zip(METHODS, ("tab:orange", "tab:blue")):
    for sd in common.seeds_of(s.seeds):
      res = results[f"main/{method}/seed{sd}"]
      pts = _points(res)
      r = [1.0] + [p["flops"] for p in pts]
      label = METHOD_NAMES[method] if sd == 0 else None
      ax0.plot(r, [1e3 * res["dense_latency"]] + [1e3 * p["latency"] for p in pts], "o-",
               color=color, alpha=0.7, ms=3, label=label)
      ax1.plot(r, [1.0] + [p["speedup"] for p in pts], "o-", color=color, alpha=0.7, ms=3,
               label=label)
      top = max(top, *r)
  grid = np.linspace(1.0, top, 20)
  ax1.plot(grid, grid, "k:", lw=1, label="speed-up = FLOP ÷")
  ax1.plot(grid, 0.8 * grid, "k--", lw=1, label="0.8 × FLOP ÷ (goal)")
  ax0.set(xlabel="FLOP reduction (dense / slim)", ylabel=f"CPU latency, batch {s.latency_batch} (ms)",
          title=f"{s.net}: slim networks")
  ax1.set(xlabel="FLOP reduction (dense / slim)", ylabel="speed-up (interleaved medians)",
          title="speed-up against FLOP reduction")
  for ax in (ax0, ax1):
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
  fig.savefig(target, dpi=80)
  plt.close(fig)
  return target


def _compute(results: dict) -> str:
  parts = []
  for prefix, what in (("main/", "main runs"), ("design/", "design runs")):
    rs = [r for k, r in results.items() if k.startswith(prefix)]
    parts.append(f"{what} {len(rs)}: {sum(r['cpu_s'] for r in rs) / 60:.1f} CPU-min, "
                 f"{sum(r['wall_s'] for r in rs) / 60:.1f} min wall")
  return "; ".join(parts)


def report(s: Settings, results: dict, out: str) -> str:
  text = (f"{s.net}{' ' + str(dict(s.model_kwargs)) if s.model_kwargs else ''} on Fashion-MNIST padded to 32×32×3, SplitLBI (Nesterov, "
          f"wd 1e-4, α = 0.1 with {s.warmup} warm-up steps, κ = 1, ν = {s.nu:g}, λ = {s.lam:g} "
          f"with thresholds λ·√d, λ 1 on the classifier) for {s.steps} steps of batch {s.batch}, "
          f"stopped at {tuple(s.stops)}; fine-tuning {s.finetune_steps} steps of SGD (lr "
          f"{s.finetune_lr:g}, momentum 0.9, wd 1e-4) under the fixed mask; test on the first "
          f"{s.eval_examples} test images; CPU latency at batch {s.latency_batch}, dense and "
          f"slim interleaved, {s.rounds} rounds (medians). Mean ± sd over {s.seeds} seeds. "
          f"Compute: {_compute(results)}.\n\n"
          "*Layers completed*: layers (or classes) with no group in supp Γ, given their next "
          "group to enter for slimming and fine-tuning (no conv stack cut in two); *W on supp "
          "Γ* is tested without that.\n\n### Early stops\n\n" + _stop_table(s, results))
  rows = matched(s, results)
  text += ("\n### Matched FLOPs\n\nNested masks `prune_to_sparsity(scope=\"global\")` of the "
           f"last stop at densities {tuple(s.densities)}:\n\n" + _matched_points_table(s, results)
           + "\nInterpolated (log FLOP ÷) over each seed's slim networks (stops and densities); "
           "accuracy of W on the mask without fine-tuning:\n\n" + _matched_table(rows))
  png = plot(s, results, os.path.join(out, "groups.png"))
  text += f"\n![latency and speed-up against FLOP reduction]({os.path.basename(png)})\n"
  bn, members = _design_tables(s, results)
  text += (f"\n### Design decisions ({s.design_net}, cross-leaf groups, {s.design_steps} steps, "
           f"stops {tuple(s.design_stops)}, {s.design_seeds} seeds)\n\n"
           f"(a) BatchNorm scale / shift in the channel's group or only under its mask "
           f"(producers):\n\n{bn}\n(b) Group members (BatchNorm attached):\n\n{members}")
  return text
