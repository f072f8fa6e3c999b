"""Compile time, and update time as the leaf count and the parameter count grow.

- Compile time (lower + compile) of the donated update step per architecture
  tree and optimizer.
- Many small leaves: L conv kernels (3, 3, 16, 16) for growing L (per-leaf
  kernel-launch overhead dominates; reported per leaf).
- Parameter count: 2 conv kernels (3, 3, C, C) for growing C (bandwidth
  dominates; reported as time / bandwidth bound).

Run alone: ``python -m benchmarks.scaling [--quick]``; in the suite:
``python -m benchmarks.run --only scaling``.
"""

from __future__ import annotations

import argparse
import gc
import json

import jax
import jax.numpy as jnp

from benchmarks import common, measure, optimizers, shapes

OPTS = ("sgd", "splitlbi", "splitlbi_lean", "adamw")


def compile_times(archs, opts=OPTS) -> dict:
  res = {}
  for arch in archs:
    tree = shapes.ARCHS[arch]()
    res[arch] = {}
    for o in opts:
      opt = optimizers.make(o)
      params = shapes.materialize(tree)
      state = opt.init(params)
      # Fresh jit object per measurement: no cache hit.
      res[arch][o], _ = common.compile_time(optimizers.update_step(opt), params, state, params)
      del params, state
    gc.collect()
  return res


def _tree(n_leaves: int, shape) -> dict:
  return {f"conv{i}": {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
          for i in range(n_leaves)}


def time_trees(trees: dict, rounds: int, opts=("sgd", "splitlbi"), copy_bytes=64 * 2**20) -> dict:
  """Interleaved update times of ``opts`` over every tree in ``trees``."""
  steppers, meta = {}, {}
  for key, tree in trees.items():
    grads = shapes.materialize(tree, seed=1)
    for o in opts:
      steppers[(key, o)], ct = measure.update_stepper(o, tree, grads)
      meta[(key, o)] = {"compile_s": ct, "bytes": optimizers.bytes_moved(o, tree),
                        "params": shapes.num_params(tree), "leaves": len(jax.tree.leaves(tree))}
  steppers[("copy", "copy")], copy_moved = common.copy_stepper(copy_bytes)
  times = common.interleaved({f"{k[0]}|{k[1]}": v for k, v in steppers.items()}, rounds)
  bw = copy_moved / common.stats(times.pop("copy|copy"))["median"]
  out = {"copy_bandwidth": bw, "rows": []}
  for (key, o), m in meta.items():
    st = common.stats(times[f"{key}|{o}"])
    out["rows"].append({"key": key, "opt": o, **m, "median": st["median"], "iqr": st["iqr"],
                        "per_leaf_us": st["median"] / m["leaves"] * 1e6,
                        "x_bound": st["median"] / (m["bytes"] / bw)})
  return out


def run(quick: bool = False) -> dict:
  res = {"compile_s": compile_times(("LeNet-5", "ResNet-20", "ResNet-50") if not quick
                                    else ("LeNet-5",))}
  print("[scaling] compile:", {a: {o: round(t, 2) for o, t in d.items()}
                               for a, d in res["compile_s"].items()}, flush=True)
  ls = (4, 16, 64) if quick else (4, 16, 64, 256)
  res["leaves"] = time_trees({L: _tree(L, (3, 3, 16, 16)) for L in ls}, 10 if quick else 20)
  print("[scaling] leaves:", [(r["key"], r["opt"], round(r["median"] * 1e3, 3), round(r["compile_s"], 2))
                              for r in res["leaves"]["rows"]], flush=True)
  cs = (32, 256) if quick else (32, 128, 512, 1024)
  res["params"] = time_trees({c: _tree(2, (3, 3, c, c)) for c in cs}, 5 if quick else 11,
                             copy_bytes=64 * 2**20 if quick else 256 * 2**20)
  print("[scaling] params:", [(r["params"], r["opt"], round(r["median"] * 1e3, 3), round(r["x_bound"], 2))
                              for r in res["params"]["rows"]], flush=True)
  return res


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  print(json.dumps(run(ap.parse_args().quick), default=float)[:3000])
