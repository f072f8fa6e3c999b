"""Measurement sections of ``benchmarks.device_check``, each run in its own process.

``python -m benchmarks.device_workers {update,train} --json F --deadline T
[--model M] [--smoke]`` writes its results to F after every finished unit (a
tree, an optimizer), so a section killed at its time limit still reports what
it measured. After the wall-clock ``deadline`` (seconds since the epoch) no new
unit is started; the units left are listed under ``"skipped"``.

Timing on an accelerator: the calls are asynchronous, so one timed *sample* is
``calls`` consecutive calls (each consuming the previous call's donated
outputs) followed by ``jax.block_until_ready``, divided by ``calls``; ``calls``
is chosen per candidate after warm-up so that a sample lasts about
``SAMPLE_S``. Candidates are timed round-robin in shuffled order
(:func:`benchmarks.common.interleaved`); medians and IQRs over rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
import traceback

import jax

from benchmarks import common, optimizers, shapes

UPDATE_OPTS = ("sgd", "splitlbi", "splitlbi_lean", "adamw")
TRAIN_OPTS = ("sgd", "splitlbi", "splitlbi_lean")  # priority order (lean dropped first)
SMOKE_TRAIN_OPTS = ("sgd", "splitlbi")
MEMORY_ORDER = ("sgd", "splitlbi_lean", "splitlbi")  # increasing state: see bench_train_memory
SAMPLE_S = 0.03   # target duration of one timed sample (many calls on GPU)
SMOKE_SAMPLE_S = 0.003
MAX_CALLS = 200
# Trees of the update section: name -> (tree factory, rounds).
UPDATE_TREES = {"ResNet-50": (shapes.resnet50, 15), "VGG-16": (shapes.vgg16, 15),
                "Transformer-1.3B": (shapes.transformer, 9)}
SMOKE_TREES = {"Transformer-tiny": (lambda: shapes.transformer(1, 32, 4, 100, 16), 3)}
COPY_BYTES, SMOKE_COPY_BYTES = 2**30, 2**22
# Train-step models (Table 6 of the paper): key -> (model, input shape, batch, classes, rounds).
# ResNet-18 first: when the budget runs short, ResNet-20 (small, cheap) is what is lost.
TRAIN_MODELS = {"ResNet-18": ("resnet18", (224, 224, 3), 256, 1000, 8),
                "ResNet-20": ("resnet20", (32, 32, 3), 128, 10, 12)}
SMOKE_TRAIN_MODELS = {"DigitsCNN": ("digits_cnn", (8, 8, 1), 8, 10, 3)}
MEMORY_STEPS = 3  # steps run per optimizer before reading the peak device memory


class RepeatStepper(common.Stepper):
  """A :class:`common.Stepper` whose sample is ``calls`` chained calls, then one sync."""

  calls = 1

  def run(self) -> float:
    t0 = time.perf_counter()
    state = self.state
    for _ in range(self.calls):
      state = tuple(self.fn(*state, *self.const))
    jax.block_until_ready(state)
    self.state = state
    return (time.perf_counter() - t0) / self.calls


def calibrate(steppers: dict, target_s: float | None = None) -> dict[str, int]:
  """Warms every stepper up and sets its ``calls`` so a sample lasts ~``target_s``
  (default :data:`SAMPLE_S`)."""
  target_s = SAMPLE_S if target_s is None else target_s
  for s in steppers.values():
    s.calls = 1
    s.run()
    per_call = min(s.run(), s.run())
    s.calls = max(1, min(MAX_CALLS, math.ceil(target_s / max(per_call, 1e-7))))
  return {n: s.calls for n, s in steppers.items()}


def device_info() -> dict:
  """Backend, device kind, memory limit and versions, as this process sees them."""
  info = common.machine_info()
  stats = common.device_memory_stats() or {}
  info["bytes_limit"] = stats.get("bytes_limit")
  try:
    info["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
  except Exception:  # pylint: disable=broad-except
    info["default_matmul_precision"] = os.environ.get("JAX_DEFAULT_MATMUL_PRECISION")
  return info


def _past(deadline: float, reserve_s: float = 0.0) -> bool:
  return time.time() + reserve_s > deadline


def _free() -> None:
  gc.collect()


# ----------------------------------------------------------------------------- update


def _update_stepper(name: str, tree, grads) -> tuple[RepeatStepper, float]:
  opt = optimizers.make(name)
  params = shapes.materialize(tree, seed=0)
  state = opt.init(params)
  compile_s, compiled = common.compile_time(optimizers.update_step(opt), params, state, grads)
  return RepeatStepper(compiled, (params, state), (grads,)), compile_s


def _fits_at_once(tree, opts, copy_bytes: int) -> bool:
  """Whether all optimizers' params + state, the grads and the copy fit in ~60% of memory."""
  limit = (common.device_memory_stats() or {}).get("bytes_limit")
  if not limit:
    return True
  p = shapes.num_bytes(tree)
  need = p + copy_bytes + sum(p + (optimizers.bytes_moved(o, tree) - 3 * p) // 2
                              for o in opts)
  return need < 0.6 * limit


def _time_group(names, tree, grads, rounds, copy_bytes) -> tuple[dict, dict, dict]:
  """Times ``names`` interleaved with a copy; returns (times, calls, compile_s)."""
  steppers, compile_s = {}, {}
  for n in names:
    steppers[n], compile_s[n] = _update_stepper(n, tree, grads)
  copy, _ = common.copy_stepper(copy_bytes)
  steppers["copy"] = RepeatStepper(copy.fn, copy.state)
  calls = calibrate(steppers)
  times = common.interleaved(steppers, rounds, warmup=1)
  del steppers, copy
  _free()
  return times, calls, compile_s


def bench_update_tree(tree, rounds: int, copy_bytes: int, deadline: float) -> dict:
  """All optimizers on one tree: times, bytes, bandwidth fraction, ratio to SGD."""
  grads = shapes.materialize(tree, seed=1)
  together = _fits_at_once(tree, UPDATE_OPTS, copy_bytes)
  groups = [UPDATE_OPTS] if together else [(o,) for o in UPDATE_OPTS]
  out = {"params": shapes.num_params(tree), "param_bytes": shapes.num_bytes(tree),
         "leaves": len(jax.tree.leaves(tree)), "interleaved": "all" if together else
         "each optimizer with the copy, one at a time (memory)", "opts": {}, "skipped": [],
         "errors": {}}
  for group in groups:
    if _past(deadline):
      out["skipped"].extend(group)
      continue
    try:
      times, calls, compile_s = _time_group(group, tree, grads, rounds, copy_bytes)
    except Exception:  # pylint: disable=broad-except  (e.g. out of memory: try the next)
      out["errors"][",".join(group)] = traceback.format_exc()[-3000:]
      _free()
      continue
    copy = common.stats(times.pop("copy"))
    bw = 2 * (copy_bytes // 4) * 4 / copy["median"]
    for n in group:
      st, moved = common.stats(times[n]), optimizers.bytes_moved(n, tree)
      out["opts"][n] = {**st, "bytes": moved, "calls_per_sample": calls[n],
                        "compile_s": compile_s[n], "copy_bandwidth": bw,
                        "achieved_bandwidth": moved / st["median"],
                        "fraction_of_copy_bandwidth": moved / bw / st["median"]}
  sgd = out["opts"].get("sgd", {}).get("median")
  for o in out["opts"].values():
    o["ratio_vs_sgd"] = o["median"] / sgd if sgd else None
  del grads
  _free()
  return out


def measure_copy(copy_bytes: int, rounds: int = 20) -> dict:
  """Device copy bandwidth: donated ``x + 1`` over ``copy_bytes`` (read + write counted)."""
  copy, moved = common.copy_stepper(copy_bytes)
  stepper = RepeatStepper(copy.fn, copy.state)
  calls = calibrate({"copy": stepper})["copy"]
  st = common.stats([stepper.run() for _ in range(rounds)])
  return {**st, "bytes": moved, "bandwidth": moved / st["median"], "calls_per_sample": calls}


def run_update(smoke: bool, deadline: float, write) -> dict:
  res = {"info": device_info(), "trees": {}, "skipped": [], "errors": {}}
  copy_bytes = SMOKE_COPY_BYTES if smoke else COPY_BYTES
  res["copy"] = measure_copy(copy_bytes)
  write(res)
  for name, (factory, rounds) in (SMOKE_TREES if smoke else UPDATE_TREES).items():
    if _past(deadline, 5.0):
      res["skipped"].append(name)
      continue
    try:
      res["trees"][name] = bench_update_tree(factory(), rounds, copy_bytes, deadline)
      o = res["trees"][name]["opts"]
      print(f"[update] {name}: " + ", ".join(
          f"{n} {v['median'] * 1e3:.3f} ms ({v['fraction_of_copy_bandwidth']:.2f} of copy BW)"
          for n, v in o.items()), flush=True)
    except Exception:  # pylint: disable=broad-except
      res["errors"][name] = traceback.format_exc()[-3000:]
      print(f"[update] {name} failed:\n{res['errors'][name]}", flush=True)
    _free()
    write(res)
  return res


# ----------------------------------------------------------------------------- train step


def enable_compilation_cache(cache_dir: str) -> None:
  """Persistent compilation cache shared by the timing and the memory process.

  The memory process loads the train steps the timing process compiled, so no
  autotuning (whose scratch buffers come from the device allocator and would
  count in ``peak_bytes_in_use``) happens there.
  """
  for name, value in (("jax_compilation_cache_dir", cache_dir),
                      ("jax_persistent_cache_min_compile_time_secs", 0.0),
                      ("jax_persistent_cache_min_entry_size_bytes", -1)):
    try:
      jax.config.update(name, value)
    except Exception as e:  # pylint: disable=broad-except  (then "load s" shows the miss)
      print(f"[cache] could not set {name}: {e!r}", flush=True)


def _build(spec: tuple):
  """(model, init, x, y, params count): ``init()`` gives fresh device params and stats."""
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  model_name, shape, batch, classes, _ = spec
  model, params, bs, x, y = train_step.build(model_name, shape, batch, num_classes=classes)
  host = jax.device_get((params, bs))  # no device copy kept between optimizers
  del params, bs
  _free()
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(host[0]))
  return model, lambda: jax.device_put(host), x, y, count


def _compile_step(model, init, x, y, opt_name: str):
  """(compiled train step, lower + compile seconds, static memory, state bytes)."""
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  opt = optimizers.make(opt_name)
  params, bs = init()
  state = jax.eval_shape(opt.init, params)
  secs, compiled = common.compile_time(train_step.make_train_step(model, opt),
                                       params, bs, state, x, y)
  return compiled, {"compile_s": secs, "memory_analysis": common.memory_analysis(compiled),
                    "state_bytes": common.tree_bytes(state)}


def _train_timing(compiled: dict, init, x, y, rounds: int) -> dict:
  steppers = {}
  for name, fn in compiled.items():
    params, bs = init()
    steppers[name] = RepeatStepper(fn, (params, bs, optimizers.make(name).init(params)), (x, y))
  calls = calibrate(steppers)
  times = common.interleaved(steppers, rounds, warmup=1)
  out = {n: {**common.stats(t), "calls_per_sample": calls[n]} for n, t in times.items()}
  if "sgd" in times:
    for n, t in times.items():
      out[n]["ratio_vs_sgd"] = out[n]["median"] / out["sgd"]["median"]
      out[n]["paired_ratio"] = common.stats([a / b for a, b in zip(t, times["sgd"])])
  del steppers
  _free()
  return out


def bench_train_model(spec: tuple, deadline: float, opts: tuple = TRAIN_OPTS) -> dict:
  """Compiles the step for each optimizer (lean last, dropped first when time is short),
  then times them interleaved."""
  model, init, x, y, count = _build(spec)
  out = {"model": spec[0], "batch": spec[2], "input_shape": list(spec[1]), "params": count,
         "compile": {}, "skipped": []}
  compiled, last_s = {}, 0.0
  for i, name in enumerate(opts):
    # SGD and SplitLBI are always tried; lean only if another compile like the last fits
    # (the first compile autotunes the convolutions, later ones reuse that).
    if _past(deadline, (last_s if name == "splitlbi_lean" else 0.0) + 5.0):
      out["skipped"].extend(opts[i:])
      break
    compiled[name], out["compile"][name] = _compile_step(model, init, x, y, name)
    last_s = out["compile"][name]["compile_s"]
  if compiled and not _past(deadline, 3.0):
    out["timing"] = _train_timing(compiled, init, x, y, spec[4])
  elif compiled:
    out["skipped"].append("timing")
  return out


def _train_memory(model, init, x, y, opt_name: str) -> dict:
  """Loads (from the cache) and runs MEMORY_STEPS steps of one optimizer; device memory."""
  opt = optimizers.make(opt_name)
  compiled, rec = _compile_step(model, init, x, y, opt_name)
  rec["load_s"] = rec.pop("compile_s")
  params, bs = init()
  state = opt.init(params)
  before = common.device_memory_stats() or {}
  for _ in range(MEMORY_STEPS):
    params, bs, state = compiled(params, bs, state, x, y)
  jax.block_until_ready((params, bs, state))
  after = common.device_memory_stats() or {}
  rec["bytes_in_use_after"] = after.get("bytes_in_use")
  if "peak_bytes_in_use" in after:
    rec["peak_bytes_in_use"] = after["peak_bytes_in_use"]
    rec["peak_rose"] = after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0)
  del params, bs, state, compiled
  _free()
  return rec


def bench_train_memory(spec: tuple, opts, deadline: float) -> dict:
  """Peak device memory of each optimizer's step, in one process.

  ``peak_bytes_in_use`` never decreases within a process, so the optimizers
  run in order of increasing state (SGD, lean, default), the previous one's
  buffers freed; a peak that did not rise is an upper bound (``peak_rose``).
  """
  model, init, x, y, _ = _build(spec)
  out, skipped = {}, []
  for name in MEMORY_ORDER:
    if name not in opts:
      continue
    if _past(deadline, 3.0):
      skipped.append(name)
      continue
    out[name] = _train_memory(model, init, x, y, name)
  return {"memory": out, "skipped": skipped}


def run_train(model_key: str, smoke: bool, deadline: float, write, opts=None) -> dict:
  """Timing run (``opts`` None) or memory run (``opts``: the optimizers to load)."""
  spec = (SMOKE_TRAIN_MODELS if smoke else TRAIN_MODELS)[model_key]
  res = {"info": device_info(), "model_key": model_key}
  write(res)
  try:
    if opts is None:
      res["result"] = bench_train_model(spec, deadline, SMOKE_TRAIN_OPTS if smoke else TRAIN_OPTS)
      t = res["result"].get("timing", {})
      print(f"[train] {model_key}: " + ", ".join(
          f"{n} {v['median'] * 1e3:.2f} ms (x{v.get('ratio_vs_sgd') or float('nan'):.3f})"
          for n, v in t.items()), flush=True)
    else:
      res["result"] = bench_train_memory(spec, opts, deadline)
      print(f"[memory] {model_key}: " + ", ".join(
          f"{n} peak {v.get('peak_bytes_in_use')} B" for n, v in res["result"]["memory"].items()),
          flush=True)
  except Exception:  # pylint: disable=broad-except
    res["error"] = traceback.format_exc()[-3000:]
    print(f"[train] {model_key} failed:\n{res['error']}", flush=True)
  write(res)
  return res


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("section", choices=("update", "train", "memory"))
  ap.add_argument("--json", required=True)
  ap.add_argument("--deadline", type=float, required=True, help="seconds since the epoch")
  ap.add_argument("--model", default=None, help="train / memory: a key of TRAIN_MODELS")
  ap.add_argument("--opts", default=None, help="memory: comma-separated optimizers")
  ap.add_argument("--cache-dir", default=None, help="persistent compilation cache")
  ap.add_argument("--smoke", action="store_true")
  a = ap.parse_args(argv)
  if a.smoke:
    global SAMPLE_S  # pylint: disable=global-statement
    SAMPLE_S = SMOKE_SAMPLE_S
  if a.cache_dir:
    enable_compilation_cache(a.cache_dir)

  def write(res: dict) -> None:
    tmp = a.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(res, f, default=str)
    os.replace(tmp, a.json)

  print(f"[{a.section}] backend {jax.default_backend()}, devices {jax.devices()}", flush=True)
  if a.section == "update":
    run_update(a.smoke, a.deadline, write)
  else:
    opts = a.opts.split(",") if a.section == "memory" else None
    run_train(a.model, a.smoke, a.deadline, write, opts)


if __name__ == "__main__":
  main()
