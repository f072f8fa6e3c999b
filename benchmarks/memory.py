"""Memory: optimizer-state bytes per parameter byte, and peak memory of a step.

- State bytes are counted exactly from the state tree (every array leaf),
  in total and over penalized leaves only (where SplitLBI keeps b, V, Γ).
- XLA's static buffer assignment of the compiled train step
  (``memory_analysis``: arguments, outputs, aliased, temporaries).
- Peak memory: on CPU the process peak RSS (``ru_maxrss``), measured in a fresh
  subprocess per configuration (the peak never decreases within a process),
  minus the peak RSS of the same subprocess after imports and JAX start-up;
  peak device memory is measured by the device suite
  (:func:`benchmarks.measure.train_memory`).

Modes: ``sgd``; SplitLBI ``default``; ``lean`` (``store_gamma=False``);
``bf16`` (bf16 parameters, ``state_dtype=float32``); ``adamw``; ``adam`` (SplitLBI
with ``direction=optax.scale_by_adam()``: no momentum buffer, Adam's μ and ν).

Run alone: ``python -m benchmarks.memory [--quick]``; in the suite:
``python -m benchmarks.run --only memory``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

import optax_splitlbi as osl
from benchmarks import common, measure, optimizers, shapes, suite

MODES = ("sgd", "default", "lean", "bf16", "adamw", "adam")


def make_opt(mode: str) -> optax.GradientTransformation:
  return optimizers.make({"sgd": "sgd", "default": "splitlbi", "lean": "splitlbi_lean",
                          "bf16": "splitlbi_f32state", "adamw": "adamw",
                          "adam": "splitlbi_adam"}[mode])


def state_accounting(params, state) -> dict:
  """Exact state bytes, in total and on penalized leaves, per parameter byte."""
  pbytes = common.tree_bytes(params)
  sbytes = common.tree_bytes(state)
  out = {"param_bytes": pbytes, "state_bytes": sbytes, "state_per_param_byte": sbytes / pbytes}
  try:
    st = osl.find_state(state)
  except ValueError:
    return out
  treedef = jax.tree.structure(params)
  pens = treedef.flatten_up_to(st.penalty)
  leaves = treedef.flatten_up_to(params)
  fields = [treedef.flatten_up_to(t) for t in (st.momentum, st.v, st.gamma) if t is not None]
  pen_p = sum(int(p.nbytes) for p, pe in zip(leaves, pens) if pe is not None)
  # b, V, Γ of the penalized leaves (with a direction b is a static ParamShape: no bytes)
  pen_s = sum(common.tree_bytes(f[i]) for f in fields for i, pe in enumerate(pens)
              if pe is not None)
  out.update({"penalized_param_bytes": pen_p, "penalized_state_bytes": pen_s,
              "penalized_state_per_param_byte": pen_s / pen_p,
              "penalized_fraction_of_params": pen_p / pbytes})
  return out


def _stepper(kind: str, model: str, mode: str) -> tuple[common.Stepper, dict, float, object]:
  """The step of one configuration: (stepper, state accounting, compile s, executable)."""
  opt = make_opt(mode)
  pdtype = jnp.bfloat16 if mode == "bf16" else None
  if kind == "train":
    spec = suite.TRAIN_MODELS["full"][model]
    built = measure.build(spec.model, spec.input_shape, spec.batch, param_dtype=pdtype)
    params, bs = built.init()
    state = opt.init(params)
    jitted = measure.make_train_step(built.module, opt)
    ct, compiled = common.compile_time(jitted, params, bs, state, built.x, built.y)
    stepper = common.Stepper(compiled, (params, bs, state), (built.x, built.y))
  else:
    tree = shapes.ARCHS[model](pdtype or jnp.float32)
    params, grads = shapes.materialize(tree), shapes.materialize(tree, seed=1)
    state = opt.init(params)
    ct, compiled = common.compile_time(optimizers.update_step(opt), params, state, grads)
    stepper = common.Stepper(compiled, (params, state), (grads,))
  return stepper, state_accounting(params, state), ct, compiled


def _worker(kind: str, model: str, mode: str) -> dict:
  """Runs in a fresh process: builds, compiles and runs 3 steps; reports memory."""
  base_rss = common.peak_rss_bytes()
  stepper, acct, ct, compiled = _stepper(kind, model, mode)
  for _ in range(3):
    stepper.run()
  peak = common.peak_rss_bytes()
  return {**acct, "compile_s": ct, "memory_analysis": common.memory_analysis(compiled),
          "peak_rss_bytes": peak, "startup_rss_bytes": base_rss,
          "peak_rss_above_startup": peak - base_rss}


def measure_config(kind: str, model: str, mode: str) -> dict:
  """Runs :func:`_worker` in a fresh interpreter and returns its JSON."""
  out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--worker", kind, model, mode],
                       capture_output=True, text=True, cwd=common.ROOT, check=False)
  if out.returncode != 0:
    return {"error": out.stderr[-2000:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
  configs = [("train", "ResNet-20"), ("update", "ResNet-50")]
  if quick:
    configs = [("train", "LeNet-5"), ("update", "ResNet-20")]
  # Fresh processes, 4 at a time: each one's peak RSS is its own.
  jobs = [(kind, model, m) for kind, model in configs for m in MODES]
  with concurrent.futures.ThreadPoolExecutor(4) as ex:
    outs = list(ex.map(lambda j: measure_config(*j), jobs))
  res = {}
  for (kind, model, m), r in zip(jobs, outs):
    res.setdefault(f"{kind}:{model}", {})[m] = r
  for key in res:
    print(f"[memory] {key}: " + ", ".join(
        f"{m} state/param {r.get('state_per_param_byte', float('nan')):.3f} "
        f"peakRSS+{r.get('peak_rss_above_startup', 0)/2**20:.0f} MiB"
        for m, r in res[key].items()), flush=True)
  return res


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--worker", nargs=3, metavar=("KIND", "MODEL", "MODE"))
  a = ap.parse_args()
  if a.worker:
    print(json.dumps(_worker(*a.worker), default=float))
  else:
    print(json.dumps(run(a.quick), default=float)[:3000])
