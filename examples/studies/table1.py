"""Study 1: Table 1 on Fashion-MNIST: SplitLBI and SGD variants and Adam, over seeds.

LeNet-5 and Conv-4 (``fashion/<model>/<variant>`` configs: the paper's
hyperparameters with a 100-step warm-up, at the budgeted size). Reported: the
test accuracy of the dense W (the paper's Table 1), and for SplitLBI also of W
on supp Γ and the fraction of weights in supp Γ.
"""

from __future__ import annotations

import dataclasses
import os

from examples.configs import fashion
from examples.configs.table1 import VARIANTS
from examples.studies import common

# The paper's Table 1, MNIST / LeNet (a reference, not the same dataset).
PAPER_MNIST_LENET = {
    "sgd_naive": 98.87, "sgd_mom": 99.16, "sgd_mom_wd": 99.23, "sgd_nesterov": 99.23,
    "adam": 99.19, "splitlbi_naive": 99.02, "splitlbi_mom": 99.19, "splitlbi_mom_wd": 99.20,
}
ORDER = ("sgd_naive", "sgd_mom", "sgd_mom_wd", "sgd_nesterov", "adam", "splitlbi_naive",
         "splitlbi_mom", "splitlbi_mom_wd", "splitlbi_nesterov")


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 3
  models: tuple = ("lenet5", "conv4")
  variants: tuple = ORDER
  overrides: tuple = ()  # ((field, value), ...) for every run


SETTINGS = {"full": Settings(),
            "smoke": Settings(seeds=2, models=("lenet5",),
                              variants=("sgd_mom_wd", "splitlbi_mom_wd"),
                              overrides=(("epochs", 1), ("max_steps_per_epoch", 2),
                                         ("train_examples", 256), ("eval_examples", 64),
                                         ("eval_batch_size", 64), ("warmup_steps", 2)))}


def run_key(model: str, variant: str, seed: int) -> str:
  return f"{model}/{variant}/seed{seed}"


def runs(s: Settings, dataset: str) -> list[common.Run]:
  configs = fashion.get_configs()
  out = []
  for model in s.models:
    for variant in s.variants:
      for seed in common.seeds_of(s.seeds):
        c = configs[f"fashion/{model}/{variant}"].replace(seed=seed, dataset=dataset,
                                                           **dict(s.overrides))
        out.append(common.Run(run_key(model, variant, seed), c))
  return out


def _model_table(s: Settings, results: dict, model: str) -> tuple[str, list]:
  rows, points = [], []
  for variant in s.variants:
    rs = [results[run_key(model, variant, seed)] for seed in common.seeds_of(s.seeds)]
    acc = [common.last(r, "test_accuracy") for r in rs]
    slbi = variant.startswith("splitlbi")
    rows.append([variant, common.fmt(acc),
                 common.fmt(common.last(r, "sparse_test_accuracy") for r in rs) if slbi else "",
                 common.fmt(common.last(r, "weight_density") for r in rs) if slbi else "",
                 PAPER_MNIST_LENET.get(variant, "–") if model == "lenet5" else ""])
    points.append((variant, acc))
  header = ["variant", "test acc, W (%)", "W on supp Γ (%)", "weights in supp Γ (%)",
            "paper, MNIST LeNet (%)" if model == "lenet5" else ""]
  return common.markdown_table(header, rows), points


def report(s: Settings, results: dict, out: str) -> str:
  from examples import plots
  text, panels = "", {}
  for model in s.models:
    c = fashion.get_configs()[f"fashion/{model}/sgd_mom"].replace(**dict(s.overrides))
    table, points = _model_table(s, results, model)
    size = (f"{c.epochs} epochs on {c.train_examples or 'all'} training images, test on "
            f"{c.eval_examples or 'all 10 000'} images, warm-up {c.warmup_steps} steps")
    text += f"### {model} ({size}; mean ± sd over {s.seeds} seeds)\n\n{table}\n"
    panels[model] = points
  plots.plot_errorbars(panels, os.path.join(out, "table1.png"), ylabel="test accuracy (%)",
                       scale=100.0)
  return text + "![test accuracy by variant, every seed and mean ± sd](table1.png)\n"
