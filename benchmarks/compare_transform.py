"""A/B timing of two versions of ``optax_splitlbi/transform.py`` (update only).

``python -m benchmarks.compare_transform OLD_TRANSFORM.py`` loads the file given
as a second module and times its ``splitlbi`` against the installed one,
interleaved, on several parameter trees (default and lean modes), and checks
that both give the same numbers.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np

import optax_splitlbi as osl
from benchmarks import common, optimizers, shapes


def load(path: str):
  spec = importlib.util.spec_from_file_location("transform_other", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # ``from optax_splitlbi import prox`` yields the function once the package is
  # imported; point the module at the submodule as the package itself does.
  mod.prox_lib = importlib.import_module("optax_splitlbi.prox")
  return mod


def compare(other, trees: dict, rounds: int) -> dict:
  res = {}
  for key, tree in trees.items():
    grads = shapes.materialize(tree, seed=1)
    steppers = {}
    for label, mod in (("new", osl), ("old", other)):
      for lean in (False, True):
        opt = mod.splitlbi(optimizers.LR, store_gamma=not lean)
        params = shapes.materialize(tree)
        state = opt.init(params)
        _, compiled = common.compile_time(optimizers.update_step(opt), params, state, grads)
        steppers[f"{label}{'_lean' if lean else ''}"] = common.Stepper(
            compiled, (params, state), (grads,))
    steppers["copy"], moved = common.copy_stepper(256 * 2**20)
    times = common.interleaved(steppers, rounds)
    bw = moved / np.median(times.pop("copy"))
    r = {}
    for name, ts in times.items():
      by = optimizers.bytes_moved("splitlbi_lean" if "lean" in name else "splitlbi", tree)
      r[name] = {**common.stats(ts), "x_bound": float(np.median(ts)) / (by / bw)}
    for mode in ("", "_lean"):
      r["speedup" + mode] = r["old" + mode]["median"] / r["new" + mode]["median"]
      a = jax.tree.leaves(steppers["new" + mode].state[0])
      b = jax.tree.leaves(steppers["old" + mode].state[0])
      r["max_abs_diff_params" + mode] = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
    res[str(key)] = r
    print(key, {k: (round(v["median"] * 1e3, 2), round(v["x_bound"], 2)) if isinstance(v, dict)
                else v for k, v in r.items()}, flush=True)
  return res


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("other")
  ap.add_argument("--rounds", type=int, default=9)
  ap.add_argument("--out")
  a = ap.parse_args()
  small = {f"c{i}": {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)} for i in range(256)}
  trees = {"ResNet-50": shapes.resnet50(), "ResNet-20": shapes.resnet20(), "256 small leaves": small}
  out = compare(load(a.other), trees, a.rounds)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=1, default=float)
