"""Update time with groups that span layers ÷ per-leaf groups (issue 17).

The Flax ImageNet ResNet-50 of ``examples.models`` (161 parameter leaves, 25.6 M
parameters): SplitLBI with its default per-leaf penalty (a group per conv
filter, lasso on the classifier, BatchNorm unpenalized) against SplitLBI with
``channel_groups`` (one group per removable channel: the filters of every conv
writing a residual channel with their BatchNorm scales and shifts, one norm
per group over all of them). Both stored-Γ and lean (``store_gamma=False``)
modes, timed interleaved (donated, jitted update + apply_updates); reported as
medians and the ratio cross-leaf ÷ per-leaf.

Run alone: ``python -m benchmarks.cross_leaf [--quick]``; in the suite
(``python -m benchmarks.run --only cross_leaf``) it runs again in a fresh process
with XLA:CPU's multi-output fusion flag.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp

import optax_splitlbi as osl
from benchmarks import common, measure, shapes

ROUNDS, QUICK_ROUNDS = 15, 4


def resnet50_groups(image: int = 224):
  """The example ResNet-50's params (shapes) and its ``channel_groups`` penalty."""
  from examples import models  # pylint: disable=g-import-not-at-top
  model = models.get_model("resnet50", 1000)
  x = jax.ShapeDtypeStruct((1, image, image, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                train=False))
  groups = osl.channel_groups(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables["params"], groups


def run(quick: bool = False) -> dict:
  tree, groups = resnet50_groups()
  grads = shapes.materialize(tree, seed=1)
  opts = {}
  for lean in (False, True):
    suffix = "_lean" if lean else ""
    opts[f"per_leaf{suffix}"] = osl.splitlbi(0.1, nu=100.0, store_gamma=not lean)
    opts[f"cross_leaf{suffix}"] = osl.splitlbi(0.1, nu=100.0, penalty=groups,
                                               store_gamma=not lean)
  steppers = {name: measure.update_stepper(name, tree, grads, opt)[0]
              for name, opt in opts.items()}
  times = common.interleaved(steppers, QUICK_ROUNDS if quick else ROUNDS)
  out = {"params": shapes.num_params(tree), "leaves": len(jax.tree.leaves(tree)),
         "classes": len(groups.classes), "opts": {n: common.stats(t) for n, t in times.items()}}
  for suffix in ("", "_lean"):
    out[f"ratio{suffix}"] = (out["opts"][f"cross_leaf{suffix}"]["median"]
                             / out["opts"][f"per_leaf{suffix}"]["median"])
  print("[cross_leaf] " + ", ".join(f"{n} {s['median'] * 1e3:.1f} ms"
                                    for n, s in out["opts"].items())
        + f"; cross ÷ per-leaf {out['ratio']:.3f} (lean {out['ratio_lean']:.3f})", flush=True)
  del steppers
  gc.collect()
  return out


if __name__ == "__main__":
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  print(json.dumps(run(ap.parse_args().quick), default=float)[:3000])
