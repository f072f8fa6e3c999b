"""Study `growth` (issue 19): a LeNet-5 grown from narrow against fixed widths.

Per seed, on Fashion-MNIST with SplitLBI (κ = 1, ν = 10, λ = 1, κα = 0.1,
momentum 0.9, wd 1e-4, 100 warm-up steps, constant rate):

- ``grow/preserve``: :mod:`examples.grow` from ``start`` widths, function-preserving
  widening (:func:`optax_splitlbi.widen`) with the path continued
  (:func:`optax_splitlbi.widen_state`);
- ``grow/official``: the same schedule with the official code's widening (new
  entries random, incoming *and* outgoing; BatchNorm and optimizer restarted);
- ``fixed/final``: a fixed network at the final widths of ``grow/preserve``;
- ``fixed/full``: LeNet-5 at its full widths (6, 16, 120, 84).

The fixed networks train for as many epochs as fit in the grown run's training
compute (Σ over its epochs of the forward FLOPs per image), at least one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from examples import models
from examples.configs import grow as grow_configs
from examples.studies import common

IMAGE_SHAPE = (28, 28, 1)

FULL = {"Conv_0": 6, "Conv_1": 16, "Dense_0": 120, "Dense_1": 84}
KINDS = ("grow/preserve", "grow/official", "fixed/final", "fixed/full")


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 3
  start: tuple = (("Conv_0", 4), ("Conv_1", 4), ("Dense_0", 8), ("Dense_1", 8))
  tau: float = 0.7
  round_epochs: int = 1
  max_rounds: int = 16
  final_epochs: int = 6
  train_examples: object = None
  eval_examples: object = None
  max_steps_per_epoch: object = None


SETTINGS = {"full": Settings(),
            "smoke": Settings(seeds=1, max_rounds=2, final_epochs=1, train_examples=512,
                              eval_examples=128, max_steps_per_epoch=4)}


def _kwargs(widths: dict) -> tuple:
  """LeNet-5 attributes of per-class widths."""
  return (("features", (widths["Conv_0"], widths["Conv_1"])),
          ("hidden", (widths["Dense_0"], widths["Dense_1"])))


def _config(s: Settings, dataset: str, seed: int, widths: dict):
  base, _ = grow_configs.GROWTH["grow/fashion_lenet5"]
  return base.replace(dataset=dataset, seed=seed, model_kwargs=_kwargs(widths),
                      train_examples=s.train_examples, eval_examples=s.eval_examples,
                      max_steps_per_epoch=s.max_steps_per_epoch, progress=False)


def _growth(s: Settings, **kw):
  from examples.grow import Growth  # pylint: disable=g-import-not-at-top
  return Growth(tau=s.tau, round_epochs=s.round_epochs, max_rounds=s.max_rounds,
                final_epochs=s.final_epochs, **kw)


def _execute(growth):
  def run(config, run_dir):
    del run_dir
    from examples import grow  # pylint: disable=g-import-not-at-top
    res = grow.grow_and_train(config, growth, say=lambda line: None)
    res.pop("model")
    res["flops"] = res["history"][-1]["flops"]
    return res
  return run


def _fixed(s: Settings, widths_from):
  """``prepare``: the widths (the grown run's final ones, or ``widths_from`` itself)
  and the epochs that fit in the grown run's training compute."""
  def prepare(config, runs_dir):
    from examples import grow  # pylint: disable=g-import-not-at-top
    seed = config.seed
    with open(os.path.join(runs_dir, f"grow/preserve/seed{seed}", "result.json")) as f:
      grown = json.load(f)
    widths = grown["widths"] if widths_from == "final" else widths_from
    config = config.replace(model_kwargs=_kwargs(widths))
    flops = grow.forward_flops(models.get_model(config.model, 10, **dict(config.model_kwargs)),
                               IMAGE_SHAPE)
    return config.replace(epochs=max(1, int(grown["train_flops"] // flops)))
  return prepare


def _fixed_execute(config, run_dir):
  """A fixed-width run: ``config.epochs`` epochs, no growth."""
  from examples.grow import Growth  # pylint: disable=g-import-not-at-top
  growth = Growth(round_epochs=config.epochs, final_epochs=0, max_rounds=0)
  return _execute(growth)(config, run_dir)


def runs(s: Settings, dataset: str) -> list[common.Run]:
  out = []
  start = dict(s.start)
  for seed in common.seeds_of(s.seeds):
    c = _config(s, dataset, seed, start)
    out += [common.Run(f"grow/preserve/seed{seed}", c, execute=_execute(_growth(s))),
            common.Run(f"grow/official/seed{seed}", c,
                       execute=_execute(_growth(s, mode="official"))),
            common.Run(f"fixed/final/seed{seed}", c, prepare=_fixed(s, "final"),
                       execute=_fixed_execute),
            common.Run(f"fixed/full/seed{seed}", c, prepare=_fixed(s, FULL),
                       execute=_fixed_execute)]
  return out


def _table(s: Settings, results: dict) -> str:
  rows = []
  for kind in KINDS:
    res = [results[f"{kind}/seed{sd}"] for sd in common.seeds_of(s.seeds)]
    widths = [r["widths"] for r in res]
    rows.append([kind, " / ".join(f"{np.mean([w[c] for w in widths]):.0f}" for c in FULL),
                 common.fmt([r["params"] / 1e3 for r in res], scale=1.0, digits=1),
                 common.fmt([r["flops"] / 1e3 for r in res], scale=1.0, digits=0),
                 common.fmt([r["epochs"] for r in res], scale=1.0, digits=1),
                 common.fmt([r["train_flops"] * 1e-6 for r in res], scale=1.0, digits=2),
                 common.fmt([r["test_accuracy"] for r in res], digits=2)])
  header = ["network", "widths Conv_0 / Conv_1 / Dense_0 / Dense_1 (mean)", "params (k)",
            "forward kFLOPs / image", "epochs", "training MFLOPs / image (Σ epochs)",
            "test accuracy (%)"]
  return common.markdown_table(header, rows)


def plot(s: Settings, results: dict, target: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(FULL), figsize=(12, 3))
  for ax, cls in zip(axes, FULL):
    for kind, style in (("grow/preserve", "-"), ("grow/official", "--")):
      for sd in common.seeds_of(s.seeds):
        h = results[f"{kind}/seed{sd}"]["history"]
        ax.plot([r["epoch"] for r in h], [r["widths"][cls] for r in h], style,
                color="tab:blue" if kind.endswith("preserve") else "tab:orange", alpha=0.7,
                label=kind if sd == 0 else None)
    ax.axhline(FULL[cls], color="k", lw=1, ls=":", label="LeNet-5")
    ax.set(title=cls, xlabel="epoch", ylabel="width")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
  fig.savefig(target, dpi=80)
  plt.close(fig)
  return target


def report(s: Settings, results: dict, out: str) -> str:
  png = plot(s, results, os.path.join(out, "growth.png"))
  return (f"LeNet-5 grown on Fashion-MNIST from widths {dict(s.start)} (τ = {s.tau:g}, rounds "
          f"of {s.round_epochs} epoch(s), at most {s.max_rounds} rounds, the official rule "
          f"F → max(F + 4, ⌊1.1 F⌋), then {s.final_epochs} final epochs), SplitLBI (κ = 1, "
          "ν = 10, λ = 1, κα = 0.1, momentum 0.9, wd 1e-4); the fixed networks trained for "
          "the epochs that fit in the grown run's training compute. Dense W on the test "
          f"set; mean ± sd over {s.seeds} seeds.\n\n" + _table(s, results)
          + f"\n![widths over training]({os.path.basename(png)})\n")
