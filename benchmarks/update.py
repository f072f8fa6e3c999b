"""Update-only benchmark: one donated, jitted update + apply_updates per call.

For each architecture's parameter tree (f32) SplitLBI (default and lean),
SGD-momentum and AdamW are timed interleaved with a copy kernel (``x + 1``
over a large array, donated) that measures the machine's achievable memory
bandwidth in the same run. Reported: median time, IQR, compulsory bytes,
achieved bandwidth, fraction of the copy bandwidth and time / bandwidth bound.

Run alone: ``python -m benchmarks.update [--quick]``.
"""

from __future__ import annotations

import gc

import jax

from benchmarks import common, optimizers, shapes

OPTS = ("sgd", "splitlbi", "splitlbi_lean", "adamw")
ROUNDS = {"LeNet-5": 40, "ResNet-20": 30, "ResNet-18": 9, "ResNet-50": 9, "VGG-16": 5}
QUICK_ROUNDS = {"LeNet-5": 15, "ResNet-20": 10, "ResNet-50": 4}
COPY_BYTES = 256 * 2**20


def bench_arch(arch: str, rounds: int, copy_bytes: int = COPY_BYTES) -> dict:
  tree = shapes.ARCHS[arch]()
  grads = shapes.materialize(tree, seed=1)
  steppers, moved = {}, {}
  for name in OPTS:
    opt = optimizers.make(name)
    params = shapes.materialize(tree, seed=0)
    state = opt.init(params)
    steppers[name] = common.Stepper(optimizers.update_step(opt), (params, state), (grads,))
    moved[name] = optimizers.bytes_moved(name, tree)
  steppers["copy"], copy_moved = common.copy_stepper(copy_bytes)
  times = common.interleaved(steppers, rounds)
  copy = common.stats(times.pop("copy"))
  bw = copy_moved / copy["median"]
  out = {"params": shapes.num_params(tree), "param_bytes": shapes.num_bytes(tree),
         "leaves": len(jax.tree.leaves(tree)), "copy": copy, "copy_bandwidth": bw,
         "opts": {}}
  for name in OPTS:
    st = common.stats(times[name])
    bound = moved[name] / bw
    out["opts"][name] = {**st, "bytes": moved[name], "achieved_bandwidth": moved[name] / st["median"],
                         "fraction_of_copy_bandwidth": bound / st["median"],
                         "x_bound": st["median"] / bound,
                         "ratio_vs_sgd": st["median"] / common.stats(times["sgd"])["median"]}
  del steppers
  gc.collect()
  return out


def run(quick: bool = False) -> dict:
  rounds = QUICK_ROUNDS if quick else ROUNDS
  res = {}
  for arch, r in rounds.items():
    res[arch] = bench_arch(arch, r, COPY_BYTES // 4 if quick else COPY_BYTES)
    o = res[arch]["opts"]
    print(f"[update] {arch}: " + ", ".join(
        f"{n} {o[n]['median']*1e3:.2f} ms ({o[n]['x_bound']:.2f}x bound)" for n in OPTS)
        + f"; copy bw {res[arch]['copy_bandwidth']/1e9:.1f} GB/s", flush=True)
  return res


if __name__ == "__main__":
  common.cli(run)
