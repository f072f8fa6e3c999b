"""Growing a network from narrow to the width it needs (paper Sec. 3, after eq. 14).

SplitLBI's Γ walks an inverse-scale-space path: the important filters enter
supp Γ first. A layer (channel class) whose filters have almost all entered is
*saturated*: it would use more. The growth loop trains a narrow network,
widens every saturated class and goes on::

    repeat for at most max_rounds rounds:
        train round_epochs epochs of SplitLBI
        s_c = |{channels of class c in supp Γ}| / |class c|     per class c
        if no s_c ≥ τ: stop
        F_c ← max(F_c + add, ⌊factor · F_c⌋)  for every saturated c   (≤ max_width)
    train final_epochs epochs

The official PyTorch code (``example/grow-network``: every conv starts at 16
filters, τ = 0.8, F → max(F + 4, ⌊1.1 F⌋), rounds of 10 epochs, 40 final
epochs) rebuilds the network with new random filters *and* new random input
columns of the old ones, and restarts BatchNorm and the optimizer, so the
function and the path start over at every growth step (``mode="official"``
does the same here). By default (``mode="preserve"``) widening is
:func:`optax_splitlbi.widen`: the new channels' outgoing weights are zero, so
the widened network computes the same function, and
:func:`optax_splitlbi.widen_state` continues the SplitLBI path (b, V, Γ of
the new entries zero, their entry steps −1). A class is every layer slimming
couples (a residual stage grows as one), so the first conv can saturate
without a crash.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import optax_splitlbi as slbi
from examples import input_pipeline, models, train, train_steps
from examples.configs.base import Config

_MODES = ("preserve", "official")


@dataclasses.dataclass(frozen=True)
class Growth:
  """The growth schedule (defaults: the official code's)."""

  tau: float = 0.8              # a class is saturated when ≥ τ of its channels are in supp Γ
  round_epochs: int = 10
  final_epochs: int = 40
  max_rounds: int = 20
  add: int = 4                  # F → max(F + add, ⌊factor·F⌋)
  factor: float = 1.1
  max_width: Optional[int] = None
  mode: str = "preserve"        # preserve (widen, state continued) | official (restart)


def new_width(width: int, g: Growth) -> int:
  """The official widening rule, capped at ``max_width``."""
  wide = max(width + g.add, int(math.floor(g.factor * width)))
  return wide if g.max_width is None else min(wide, max(width, g.max_width))


def saturation(groups: slbi.ChannelGroups, support: Any) -> dict[str, float]:
  """Per class: the fraction of its channels in supp Γ (a channel is in when any of its
  producing kernels' slices is; ``support``: :func:`optax_splitlbi.support` masks)."""
  flat = {slbi.penalties.path_str(p): m for p, m in
          jax.tree_util.tree_flatten_with_path(support, is_leaf=lambda x: x is None)[0]}
  out = {}
  for cls in groups.classes:
    inside = np.zeros(cls.size, bool)
    for path, axis in cls.members:
      m = flat.get(path)
      if m is None or np.ndim(m) < 2:  # biases, norm scales: not a producing kernel
        continue
      m = np.moveaxis(np.asarray(m), axis, -1).reshape(-1, cls.size)
      inside |= m.any(0)
    out[cls.name] = float(inside.mean())
  return out


@dataclasses.dataclass
class Net:
  """The network being grown: module, variables, optimizer, its classes and widths."""

  model: Any
  variables: dict
  tx: Any
  opt_state: Any
  groups: slbi.ChannelGroups

  def widths(self) -> dict[str, int]:
    return {c.name: c.size for c in self.groups.classes}


def _build(config: Config, model, variables: dict, image_shape: tuple,
           steps_per_epoch: int) -> tuple[Any, slbi.ChannelGroups]:
  """SplitLBI of ``config`` for ``model``, and the model's channel classes."""
  x = jnp.zeros((2, *image_shape), jnp.float32)
  groups = slbi.channel_groups(lambda v, x: model.apply(v, x, train=False), variables, x)
  return train.make_optimizer(config, steps_per_epoch, model, image_shape), groups


def grow(net: Net, config: Config, g: Growth, extra: dict[str, int], image_shape: tuple,
         steps_per_epoch: int, key: jax.Array) -> Net:
  """``net`` with ``extra[c]`` more channels in class ``c`` (``g.mode``)."""
  x = jnp.zeros((2, *image_shape), jnp.float32)
  wide = slbi.widen_linen(net.model, net.variables, extra, x, key=key, train=False,
                          verify=g.mode == "preserve")
  variables = wide.variables
  tx, groups = _build(config, wide.module, variables, image_shape, steps_per_epoch)
  fresh_state = tx.init(variables["params"])
  if g.mode == "preserve":
    return Net(wide.module, variables, tx, slbi.widen_state(wide, net.opt_state, fresh_state),
               groups)
  # official: every new entry random (incoming and outgoing), BatchNorm statistics and
  # the optimizer from scratch (the step count kept for the learning-rate schedule).
  fresh = wide.module.init(key, x, train=False)
  params = wide.embed(net.variables["params"], fresh["params"])
  stats = fresh.get("batch_stats", {})
  state = _with_count(fresh_state, slbi.find_state(net.opt_state).count)
  return Net(wide.module, {"params": params, "batch_stats": stats} if stats else
             {"params": params}, tx, state, groups)


def _with_count(state: Any, count: jax.Array) -> Any:
  """``state`` with SplitLBI's step count set (the schedule continues)."""
  def fix(s):
    return s._replace(count=count) if isinstance(s, slbi.SplitLBIState) else s
  return jax.tree.map(fix, state, is_leaf=lambda s: isinstance(s, slbi.SplitLBIState))


def _epoch(net: Net, step, train_ds, config: Config, epoch: int, steps: int) -> float:
  """One epoch of SplitLBI on ``net`` (in place); the mean training loss."""
  state = train_steps.TrainState(net.variables["params"], net.variables.get("batch_stats", {}),
                           net.opt_state)
  losses = []
  for batch in train_ds.train_batches(config.batch_size, epoch, max_steps=steps):
    state, m = step(state, batch, None)
    losses.append(m["loss"])
  net.variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                              if state.batch_stats else {})}
  net.opt_state = state.opt_state
  return float(np.mean(jax.device_get(losses)))


def evaluate(net: Net, eval_ds, config: Config) -> float:
  """Test accuracy of the dense W."""
  step = jax.jit(train_steps.make_eval_step(net.model))
  correct = count = 0.0
  for batch in eval_ds.eval_batches(config.eval_batch_size, max_examples=config.eval_examples):
    out = jax.device_get(step(net.variables["params"], net.variables.get("batch_stats"), batch))
    correct, count = correct + float(out["correct"]), count + float(out["count"])
  return correct / count


def grow_and_train(config: Config, g: Growth,
                   say: Callable[[str], None] = print) -> dict:
  """The growth loop (module docstring) on ``config``'s data and model.

  Returns:
    ``{"history": [per epoch: epoch, phase, loss, widths, saturation, flops, params],
    "widths": final widths, "params": final parameter count, "test_accuracy",
    "epochs": epochs trained, "train_flops": Σ over epochs of the forward FLOPs of
    one image at that epoch's widths (× examples per epoch for the total)}``.
  """
  if g.mode not in _MODES:
    raise ValueError(f"growth mode must be one of {_MODES}, got {g.mode!r}.")
  if not 0.0 < g.tau <= 1.0:
    raise ValueError(f"growth tau must be in (0, 1], got {g.tau!r}.")
  train_ds, eval_ds, info = input_pipeline.create_datasets(
      config.dataset, data_dir=config.data_dir, seed=config.seed, augment=config.augment,
      train_examples=config.train_examples)
  steps = train_ds.steps_per_epoch(config.batch_size)
  steps = min(steps, config.max_steps_per_epoch or steps)
  image_shape = tuple(info.image_shape)
  model = models.get_model(config.model, info.num_classes, **dict(config.model_kwargs))
  key = jax.random.key(config.seed, impl=config.prng_impl)
  variables = jax.jit(lambda: model.init(key, jnp.zeros((1, *image_shape)), train=False))()
  tx, groups = _build(config, model, variables, image_shape, steps)
  net = Net(model, dict(variables), tx, tx.init(variables["params"]), groups)
  history: list[dict] = []

  def train_epochs(n: int, phase: str) -> dict[str, float]:
    step = jax.jit(train_steps.make_train_step(net.model, net.tx))
    sat: dict[str, float] = {}
    for _ in range(n):
      loss = _epoch(net, step, train_ds, config, len(history) + 1, steps)
      sat = saturation(net.groups, jax.device_get(slbi.support(net.opt_state)))
      history.append(dict(epoch=len(history) + 1, phase=phase, loss=loss, widths=net.widths(),
                          saturation=sat, flops=_flops(net, image_shape),
                          params=_count(net.variables["params"])))
      say(f"epoch {len(history)} {phase} loss {loss:.3f} widths (in supp Γ) "
          + " ".join(f"{c}={w}({100 * sat[c]:.0f}%)" for c, w in net.widths().items()))
    return sat

  for rnd in range(g.max_rounds + 1):
    sat = train_epochs(g.round_epochs, f"round {rnd}")
    extra = {c: new_width(w, g) - w for c, w in net.widths().items()
             if sat[c] >= g.tau and new_width(w, g) > w}
    if not extra or rnd == g.max_rounds:
      break
    net = grow(net, config, g, extra, image_shape, steps, jax.random.fold_in(key, rnd))
  train_epochs(g.final_epochs, "final")
  acc = evaluate(net, eval_ds, config)
  say(f"final widths {net.widths()}  params {_count(net.variables['params'])}  "
      f"test accuracy {100 * acc:.2f}%")
  return dict(history=history, widths=net.widths(), params=_count(net.variables["params"]),
              test_accuracy=acc, epochs=len(history),
              train_flops=sum(h["flops"] for h in history),
              model=net.model)


def _count(params: Any) -> int:
  return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def _flops(net: Net, image_shape: tuple) -> float:
  return forward_flops(net.model, image_shape)


def forward_flops(model, image_shape: tuple) -> float:
  """Forward FLOPs of one image (XLA's count)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                train=False))
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  cost = fn.lower(variables, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def main(argv: Optional[list[str]] = None) -> dict:
  """``python -m examples.grow --config grow/digits [--set k=v] [--grow k=v]``."""
  import argparse  # pylint: disable=g-import-not-at-top
  from examples.configs import apply_overrides, grow as grow_configs  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="grow/digits", choices=sorted(grow_configs.GROWTH))
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a Config field")
  parser.add_argument("--grow", action="append", default=[], metavar="KEY=VALUE",
                      help=f"override a Growth field ({', '.join(Growth.__dataclass_fields__)})")
  args = parser.parse_args(argv)
  config, g = grow_configs.GROWTH[args.config]
  config = apply_overrides(config, args.set)
  g = apply_overrides(g, args.grow)
  return grow_and_train(config, g)


if __name__ == "__main__":
  main()
