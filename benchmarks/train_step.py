"""Full train step (forward + backward + update) at batch 128, SplitLBI vs SGD-momentum.

Models come from ``examples/models.py`` (LeNet-5 on 28×28×1, ResNet-20 on
32×32×3). Parameters, BatchNorm statistics and optimizer state are donated.
The two optimizers are timed interleaved in one process; the figure of merit
is the ratio of medians.

Run alone: ``python -m benchmarks.train_step [--quick]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import common, optimizers

MODELS = {"LeNet-5": ("lenet5", (28, 28, 1)), "ResNet-20": ("resnet20", (32, 32, 3))}
BATCH = 128


def build(model_name: str, input_shape, batch: int = BATCH, param_dtype=None,
          num_classes: int = 10):
  """(module, params, batch_stats, x, y) for ``examples.models.get_model(model_name)``.

  Synthetic data: x ~ N(0, 1) of shape (batch, *input_shape), integer labels
  below ``num_classes``. The initialisation is jitted (one compile instead of
  one per op, which matters on GPU).
  """
  from examples import models  # pylint: disable=import-outside-toplevel
  model = models.get_model(model_name, num_classes=num_classes)
  kx, ky, ki = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, *input_shape), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, num_classes)
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(ki, x[:2])
  params = variables["params"]
  if param_dtype is not None:
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
  return model, params, variables.get("batch_stats", {}), x, y


def make_train_step(model, opt: optax.GradientTransformation):
  """jit(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state), donated.

  The step of ``examples.train_steps.make_train_step`` (BatchNorm when ``batch_stats``
  has leaves); its loss and accuracy are not returned, so XLA drops them.
  """
  from examples import train_steps  # pylint: disable=import-outside-toplevel
  train_step = train_steps.make_train_step(model, opt)

  def step(params, batch_stats, opt_state, x, y):
    state, _ = train_step(train_steps.TrainState(params, batch_stats, opt_state),
                          {"image": x, "label": y})
    return tuple(state)

  return jax.jit(step, donate_argnums=(0, 1, 2))


def copy_tree(t: Any) -> Any:
  return jax.tree.map(jnp.copy, t)


def bench_model(label: str, rounds: int, opts=("sgd", "splitlbi", "splitlbi_lean")) -> dict:
  name, shape = MODELS[label]
  model, params, bs, x, y = build(name, shape)
  steppers, compile_s = {}, {}
  for o in opts:
    opt = optimizers.make(o)
    p, b = copy_tree(params), copy_tree(bs)
    s = opt.init(p)
    jitted = make_train_step(model, opt)
    compile_s[o], compiled = common.compile_time(jitted, p, b, s, x, y)
    steppers[o] = common.Stepper(compiled, (p, b, s), (x, y))
  times = common.interleaved(steppers, rounds)
  out = {"model": name, "batch": BATCH, "compile_s": compile_s, "opts": {}}
  sgd = common.stats(times["sgd"])["median"]
  for o in opts:
    st = common.stats(times[o])
    out["opts"][o] = {**st, "ratio_vs_sgd": st["median"] / sgd}
  # Ratio per round (paired: same round, neighbouring in time) is more robust to drifts.
  for o in opts:
    if o != "sgd":
      paired = [a / b for a, b in zip(times[o], times["sgd"])]
      out["opts"][o]["paired_ratio"] = common.stats(paired)
  return out


def run(quick: bool = False) -> dict:
  # (rounds, optimizers); ResNet-20 steps take seconds on CPU: SplitLBI vs SGD only.
  plan = {"LeNet-5": (10 if quick else 40, ("sgd", "splitlbi", "splitlbi_lean")),
          "ResNet-20": (3 if quick else 10, ("sgd", "splitlbi"))}
  res = {}
  for label, (r, opts) in plan.items():
    res[label] = bench_model(label, r, opts)
    o = res[label]["opts"]
    print(f"[train] {label}: " + ", ".join(
        f"{n} {o[n]['median']*1e3:.1f} ms (x{o[n]['ratio_vs_sgd']:.3f})" for n in o), flush=True)
  return res


if __name__ == "__main__":
  common.cli(run)
