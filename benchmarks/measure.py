"""The measurements, one function each: the update alone, a full train step, peak memory.

Every function times its candidates interleaved (:func:`benchmarks.common.timed`)
under a :class:`benchmarks.common.Timing` (one call per sample on CPU, calibrated
chains of calls on an accelerator), and stops starting new units after a
wall-clock ``deadline`` (seconds since the epoch), listing them as skipped.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from benchmarks import common, optimizers, shapes

UPDATE_OPTS = ("sgd", "splitlbi", "splitlbi_lean", "adamw", "splitlbi_adam")
TRAIN_OPTS = ("sgd", "splitlbi", "splitlbi_lean")  # priority order (lean dropped first)
MEMORY_ORDER = ("sgd", "splitlbi_lean", "splitlbi")  # increasing state: see train_memory
MEMORY_STEPS = 3  # steps run per optimizer before reading the peak device memory
NEVER = math.inf


def past_deadline(deadline: float, reserve_s: float = 0.0) -> bool:
  """Whether less than ``reserve_s`` is left before ``deadline`` (seconds since the epoch)."""
  return time.time() + reserve_s > deadline


# ----------------------------------------------------------------------------- update


def update_stepper(name: str, tree, grads, opt: optax.GradientTransformation | None = None
                   ) -> tuple[common.Stepper, float]:
  """A compiled, donated update + apply_updates of optimizer ``name`` (or ``opt``) on
  fresh parameters of ``tree``; and its compile seconds."""
  opt = opt or optimizers.make(name)
  params = shapes.materialize(tree, seed=0)
  state = opt.init(params)
  compile_s, compiled = common.compile_time(optimizers.update_step(opt), params, state, grads)
  return common.Stepper(compiled, (params, state), (grads,)), compile_s


def fits_at_once(tree, opts: Sequence[str], copy_bytes: int) -> bool:
  """Whether all optimizers' params + state, the grads and the copy fit in ~60% of memory."""
  limit = (common.device_memory_stats() or {}).get("bytes_limit")
  if not limit:
    return True
  p = shapes.num_bytes(tree)
  need = p + copy_bytes + sum(p + (optimizers.bytes_moved(o, tree) - 3 * p) // 2
                              for o in opts)
  return need < 0.6 * limit


def _time_group(names: Sequence[str], tree, grads, rounds: int, copy_bytes: int,
                timing: common.Timing) -> dict:
  """Times the updates of ``names`` interleaved with a copy kernel; one row per optimizer."""
  steppers, compile_s = {}, {}
  for n in names:
    steppers[n], compile_s[n] = update_stepper(n, tree, grads)
  steppers["copy"], copy_moved = common.copy_stepper(copy_bytes)
  times = common.timed(steppers, rounds, timing)
  calls = {n: s.calls for n, s in steppers.items()}
  del steppers
  gc.collect()
  copy = common.stats(times.pop("copy"))
  bw = copy_moved / copy["median"]
  rows = {}
  for n in names:
    st, moved = common.stats(times[n]), optimizers.bytes_moved(n, tree)
    rows[n] = {**st, "bytes": moved, "calls_per_sample": calls[n], "compile_s": compile_s[n],
               "copy": copy, "copy_bandwidth": bw, "achieved_bandwidth": moved / st["median"],
               "fraction_of_copy_bandwidth": moved / bw / st["median"],
               "x_bound": st["median"] / (moved / bw)}
  return rows


def update(tree, rounds: int, copy_bytes: int, timing: common.Timing = common.CPU,
           opts: Sequence[str] = UPDATE_OPTS, deadline: float = NEVER,
           together: bool | None = None) -> dict:
  """All ``opts`` on one parameter tree: times, bytes, bandwidth, ratio to SGD-momentum.

  ``together`` (default: if it fits in device memory) times every optimizer in one
  interleaved set; else each with its own copy kernel, one at a time.
  """
  grads = shapes.materialize(tree, seed=1)
  together = fits_at_once(tree, opts, copy_bytes) if together is None else together
  out = {"params": shapes.num_params(tree), "param_bytes": shapes.num_bytes(tree),
         "leaves": len(jax.tree.leaves(tree)), "interleaved": "all" if together else
         "each optimizer with the copy, one at a time (memory)", "opts": {}, "skipped": [],
         "errors": {}}
  for group in ([tuple(opts)] if together else [(o,) for o in opts]):
    if past_deadline(deadline):
      out["skipped"].extend(group)
      continue
    try:
      out["opts"].update(_time_group(group, tree, grads, rounds, copy_bytes, timing))
    except Exception:  # pylint: disable=broad-except  (e.g. out of memory: try the next)
      out["errors"][",".join(group)] = traceback.format_exc()[-3000:]
      gc.collect()
  sgd = out["opts"].get("sgd", {}).get("median")
  for o in out["opts"].values():
    o["ratio_vs_sgd"] = o["median"] / sgd if sgd else None
  return out


def copy_bandwidth(copy_bytes: int, timing: common.Timing, rounds: int = 20) -> dict:
  """Copy bandwidth: donated ``x + 1`` over ``copy_bytes`` (read + write counted)."""
  stepper, moved = common.copy_stepper(copy_bytes)
  times = common.timed({"copy": stepper}, rounds, timing)["copy"]
  st = common.stats(times)
  return {**st, "bytes": moved, "bandwidth": moved / st["median"],
          "calls_per_sample": stepper.calls}


# ----------------------------------------------------------------------------- train step


class TrainModel(NamedTuple):
  """A train-step benchmark: a model of ``examples.models`` on synthetic data."""

  model: str
  input_shape: tuple[int, ...]
  batch: int
  classes: int
  rounds: int
  opts: tuple[str, ...] = TRAIN_OPTS


class Built(NamedTuple):
  """A model ready to step: ``init()`` gives fresh device params and batch statistics."""

  module: Any
  init: Callable[[], tuple[Any, Any]]
  x: jax.Array
  y: jax.Array
  params: int


def build(model_name: str, input_shape, batch: int, param_dtype=None,
          num_classes: int = 10) -> Built:
  """``examples.models.get_model(model_name)`` with synthetic data.

  x ~ N(0, 1) of shape (batch, *input_shape), integer labels below
  ``num_classes``. The initialisation is jitted (one compile instead of one per
  op, which matters on GPU); the variables are kept on the host so that no
  device copy stays alive between optimizers.
  """
  from examples import models  # pylint: disable=import-outside-toplevel
  module = models.get_model(model_name, num_classes=num_classes)
  kx, ky, ki = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, *input_shape), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, num_classes)
  variables = jax.jit(lambda k, x: module.init(k, x, train=False))(ki, x[:2])
  params = variables["params"]
  if param_dtype is not None:
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
  host = jax.device_get((params, variables.get("batch_stats", {})))
  del params, variables
  gc.collect()
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(host[0]))
  return Built(module, lambda: jax.device_put(host), x, y, count)


def make_train_step(module, opt: optax.GradientTransformation):
  """jit(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state), donated.

  The step of ``examples.train_steps.make_train_step``; its loss and accuracy are
  not returned, so XLA drops them.
  """
  from examples import train_steps  # pylint: disable=import-outside-toplevel
  train_step = train_steps.make_train_step(module, opt)

  def step(params, batch_stats, opt_state, x, y):
    state, _ = train_step(train_steps.TrainState(params, batch_stats, opt_state),
                          {"image": x, "label": y})
    return tuple(state)

  return jax.jit(step, donate_argnums=(0, 1, 2))


def compile_train_step(built: Built, opt_name: str) -> tuple[Any, dict]:
  """(compiled train step, {compile_s, memory_analysis, state_bytes})."""
  opt = optimizers.make(opt_name)
  params, bs = built.init()
  state = jax.eval_shape(opt.init, params)
  secs, compiled = common.compile_time(make_train_step(built.module, opt),
                                       params, bs, state, built.x, built.y)
  return compiled, {"compile_s": secs, "memory_analysis": common.memory_analysis(compiled),
                    "state_bytes": common.tree_bytes(state)}


def _time_train_steps(compiled: dict, built: Built, rounds: int, timing: common.Timing) -> dict:
  """Interleaved timings of the compiled steps; ratios to SGD-momentum's, also per round."""
  steppers = {}
  for name, fn in compiled.items():
    params, bs = built.init()
    steppers[name] = common.Stepper(fn, (params, bs, optimizers.make(name).init(params)),
                                    (built.x, built.y))
  times = common.timed(steppers, rounds, timing)
  out = {n: {**common.stats(t), "calls_per_sample": steppers[n].calls}
         for n, t in times.items()}
  del steppers
  gc.collect()
  if "sgd" in times:  # paired: same round, neighbouring in time; robust to drifts
    for n, t in times.items():
      out[n]["ratio_vs_sgd"] = out[n]["median"] / out["sgd"]["median"]
      out[n]["paired_ratio"] = common.stats([a / b for a, b in zip(t, times["sgd"])])
  return out


def train_step(spec: TrainModel, timing: common.Timing = common.CPU,
               deadline: float = NEVER) -> dict:
  """Compiles the step for each optimizer (lean last, dropped first when time is short),
  then times them interleaved."""
  built = build(spec.model, spec.input_shape, spec.batch, num_classes=spec.classes)
  out = {"model": spec.model, "batch": spec.batch, "input_shape": list(spec.input_shape),
         "params": built.params, "compile": {}, "skipped": []}
  compiled, last_s = {}, 0.0
  for i, name in enumerate(spec.opts):
    # SGD and SplitLBI are always tried; lean only if another compile like the last fits
    # (on GPU the first compile autotunes the convolutions, later ones reuse that).
    if past_deadline(deadline, (last_s if name == "splitlbi_lean" else 0.0) + 5.0):
      out["skipped"].extend(spec.opts[i:])
      break
    compiled[name], out["compile"][name] = compile_train_step(built, name)
    last_s = out["compile"][name]["compile_s"]
  if compiled and not past_deadline(deadline, 3.0):
    out["opts"] = _time_train_steps(compiled, built, spec.rounds, timing)
  elif compiled:
    out["skipped"].append("timing")
  return out


def _device_peak(built: Built, opt_name: str) -> dict:
  """Loads (from the compilation cache) and runs MEMORY_STEPS steps; device memory."""
  opt = optimizers.make(opt_name)
  compiled, rec = compile_train_step(built, opt_name)
  rec["load_s"] = rec.pop("compile_s")
  params, bs = built.init()
  state = opt.init(params)
  before = common.device_memory_stats() or {}
  for _ in range(MEMORY_STEPS):
    params, bs, state = compiled(params, bs, state, built.x, built.y)
  jax.block_until_ready((params, bs, state))
  after = common.device_memory_stats() or {}
  rec["bytes_in_use_after"] = after.get("bytes_in_use")
  if "peak_bytes_in_use" in after:
    rec["peak_bytes_in_use"] = after["peak_bytes_in_use"]
    rec["peak_rose"] = after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0)
  del params, bs, state, compiled
  gc.collect()
  return rec


def train_memory(spec: TrainModel, opts: Sequence[str], deadline: float = NEVER) -> dict:
  """Peak device memory of each optimizer's step, in one process.

  ``peak_bytes_in_use`` never decreases within a process, so the optimizers
  run in order of increasing state (SGD, lean, default), the previous one's
  buffers freed; a peak that did not rise is an upper bound (``peak_rose``).
  """
  built = build(spec.model, spec.input_shape, spec.batch, num_classes=spec.classes)
  out, skipped = {}, []
  for name in (o for o in MEMORY_ORDER if o in opts):
    if past_deadline(deadline, 3.0):
      skipped.append(name)
      continue
    out[name] = _device_peak(built, name)
  return {"memory": out, "skipped": skipped}
