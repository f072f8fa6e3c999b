"""A/B timing of the installed ``optax_splitlbi`` against an earlier git revision (update only).

``python -m benchmarks.compare_transform --rev REV`` exports the package of git
revision ``REV`` under another name, and times its ``splitlbi`` against the
working tree's, interleaved with ``optax.sgd(momentum)`` and a copy kernel, on
several parameter trees (default and lean modes), each donated; it checks that
both versions give the same numbers. Reported per tree: medians, the speed-up
new ÷ old, and each SplitLBI's time over SGD-momentum's scaled by the bytes
each must move (36 against 20 bytes per f32 parameter for a penalized leaf):
1.0 means SplitLBI runs as close to its memory bound as optax's SGD does.
Run it once without and once with the XLA:CPU multi-output fusion flag.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import optax_splitlbi as osl
from benchmarks import common, optimizers, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_revision(rev: str):
  """The ``optax_splitlbi`` package of git revision ``rev``, imported under a new name."""
  name = "optax_splitlbi_" + re.sub(r"\W", "_", rev)
  tmp = tempfile.mkdtemp()
  os.makedirs(os.path.join(tmp, name))
  files = subprocess.check_output(["git", "ls-tree", "-r", "--name-only", rev, "optax_splitlbi/"],
                                  cwd=ROOT, text=True).split()
  for path in files:  # subpackages included
    src = subprocess.check_output(["git", "show", f"{rev}:{path}"], cwd=ROOT, text=True)
    dest = os.path.join(tmp, name, os.path.relpath(path, "optax_splitlbi"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w") as f:
      f.write(re.sub(r"\boptax_splitlbi\b", name, src))
  sys.path.insert(0, tmp)
  return importlib.import_module(name)


def _stepper(opt, tree, grads):
  params = shapes.materialize(tree)
  state = opt.init(params)
  _, compiled = common.compile_time(optimizers.update_step(opt), params, state, grads)
  return common.Stepper(compiled, (params, state), (grads,))


def compare(other, trees: dict, rounds: int) -> dict:
  """Interleaved medians of new / old SplitLBI (default and lean) and SGD per tree."""
  res = {}
  for key, tree in trees.items():
    grads = shapes.materialize(tree, seed=1)
    steppers = {"sgd": _stepper(optimizers.make("sgd"), tree, grads)}
    for label, mod in (("new", osl), ("old", other)):
      for lean in (False, True):
        opt = mod.splitlbi(optimizers.LR, store_gamma=not lean)
        steppers[f"{label}{'_lean' if lean else ''}"] = _stepper(opt, tree, grads)
    steppers["copy"], moved = common.copy_stepper(256 * 2**20)
    times = common.interleaved(steppers, rounds)
    bw = moved / np.median(times.pop("copy"))
    sgd = float(np.median(times["sgd"]))
    sgd_bytes = optimizers.bytes_moved("sgd", tree)
    r = {}
    for name, ts in times.items():
      kind = "sgd" if name == "sgd" else "splitlbi_lean" if "lean" in name else "splitlbi"
      by = optimizers.bytes_moved(kind, tree)
      med = float(np.median(ts))
      r[name] = {**common.stats(ts), "x_bound": med / (by / bw),
                 "bytes_scaled_vs_sgd": (med / sgd) / (by / sgd_bytes)}
    for mode in ("", "_lean"):
      r["speedup" + mode] = r["old" + mode]["median"] / r["new" + mode]["median"]
      a = jax.tree.leaves(steppers["new" + mode].state[0])
      b = jax.tree.leaves(steppers["old" + mode].state[0])
      r["max_abs_diff_params" + mode] = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
    res[str(key)] = r
    print(key, {k: (round(v["median"] * 1e3, 2), round(v["bytes_scaled_vs_sgd"], 3))
                if isinstance(v, dict) else v for k, v in r.items()}, flush=True)
  return res


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--rev", required=True, help="git revision to compare with, e.g. HEAD~3")
  ap.add_argument("--rounds", type=int, default=9)
  ap.add_argument("--trees", default="ResNet-50,ResNet-20,small",
                  help="comma-separated: ResNet-50, ResNet-20, VGG-16, small (256 leaves)")
  ap.add_argument("--out")
  a = ap.parse_args()
  small = {f"c{i}": {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)}
           for i in range(256)}
  known = {"small": small, **{k: v() for k, v in shapes.ARCHS.items()
                              if k in a.trees.split(",")}}
  out = compare(load_revision(a.rev), {k: known[k] for k in a.trees.split(",")}, a.rounds)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=1, default=float)
