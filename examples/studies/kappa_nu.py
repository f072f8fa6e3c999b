"""Study 2: Fig. 4 on Fashion-MNIST: W on supp Γ without fine-tuning, and its density.

SplitLBI Mom-Wd on LeNet-5, κ ∈ {1, 2, 5, 10} at ν = 100 with κα = 0.1 fixed,
and ν ∈ {10, 100, 1000} at κ = 1 (α = 0.1). Every epoch the trainer evaluates
the dense W and the sparse model W ∘ 1[Γ ≠ 0] and records the fraction of
weights in supp Γ. The paper trains 160 epochs (×0.1 at 80 and 120) with λ = 1;
here ``epochs`` epochs (×0.1 at ``milestones``) on ``train_examples`` images, so
λ is scaled down with the number of steps (a weight enters supp Γ after about
λν / (α|W|) steps), see docs/results.md.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from examples.configs import fashion
from examples.studies import common


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 3
  kappas: tuple = (1, 2, 5, 10)
  nus: tuple = (10, 100, 1000)
  nu_for_kappas: float = 100.0
  lam: float = 0.05
  epochs: int = 10
  milestones: tuple = (5, 8)
  train_examples: object = 20000
  eval_examples: object = 5000


SETTINGS = {"full": Settings(),
            "smoke": Settings(seeds=1, kappas=(1, 10), nus=(100, 1000), epochs=2,
                              milestones=(1,), train_examples=256, eval_examples=64)}


def grid(s: Settings) -> list[tuple[float, float]]:
  """The (κ, ν) pairs: the κ sweep at ν = nu_for_kappas, then the ν sweep at κ = 1."""
  pairs = [(float(k), float(s.nu_for_kappas)) for k in s.kappas]
  pairs += [(1.0, float(n)) for n in s.nus if (1.0, float(n)) not in pairs]
  return pairs


def run_key(kappa: float, nu: float, seed: int) -> str:
  return f"kappa{kappa:g}_nu{nu:g}/seed{seed}"


def runs(s: Settings, dataset: str) -> list[common.Run]:
  out = []
  for kappa, nu in grid(s):
    for seed in common.seeds_of(s.seeds):
      c = fashion.base("lenet5", dataset).replace(
          name=f"kappa_nu/kappa{kappa:g}_nu{nu:g}", kappa=kappa, nu=nu,
          learning_rate=0.1 / kappa, lam=s.lam, seed=seed, epochs=s.epochs,
          schedule="multistep", milestones=s.milestones, train_examples=s.train_examples,
          eval_examples=s.eval_examples, record_norms=False)
      out.append(common.Run(run_key(kappa, nu, seed), c))
  return out


def _runs_of(s: Settings, results: dict, kappa: float, nu: float) -> list[dict]:
  return [results[run_key(kappa, nu, seed)] for seed in common.seeds_of(s.seeds)]


def _table(s: Settings, results: dict) -> str:
  rows = []
  for kappa, nu in grid(s):
    rs = _runs_of(s, results, kappa, nu)
    sparse = np.array([common.curve(r, "sparse_test_accuracy") for r in rs])
    best = np.nanmax(sparse, axis=1)
    best_epoch = np.nanargmax(sparse, axis=1) + 1
    rows.append([f"{kappa:g}", f"{nu:g}", f"{0.1 / kappa:g}",
                 common.fmt(common.last(r, "test_accuracy") for r in rs),
                 common.fmt(common.last(r, "sparse_test_accuracy") for r in rs),
                 common.fmt(common.last(r, "weight_density") for r in rs),
                 common.fmt(best) + f" (epoch {', '.join(map(str, best_epoch))})",
                 common.fmt((common.last(r, "train_loss") for r in rs), scale=1.0, digits=3)])
  header = ["κ", "ν", "α", "test acc, W (%)", "test acc, W on supp Γ (%)",
            "weights in supp Γ (%)", "best W on supp Γ (%) (epoch per seed)",
            "train loss (last epoch)"]
  return common.markdown_table(header, rows)


def report(s: Settings, results: dict, out: str) -> str:
  from examples import plots
  panels = {}
  sweeps = (("κ", [(float(k), float(s.nu_for_kappas)) for k in s.kappas],
             f"ν = {s.nu_for_kappas:g}, κα = 0.1"),
            ("ν", [(1.0, float(n)) for n in s.nus], "κ = 1, α = 0.1"))
  for name, pairs, fixed in sweeps:
    for metric, title in (("weight_density", "weights in supp Γ"),
                          ("sparse_test_accuracy", "test acc, W on supp Γ"),
                          ("test_accuracy", "test acc, dense W")):
      panels[f"{title} ({fixed})"] = {
          f"{name} = {k if name == 'κ' else n:g}":
              np.array([common.curve(r, metric) for r in _runs_of(s, results, k, n)])
          for k, n in pairs}
  plots.plot_mean_curves(panels, os.path.join(out, "kappa_nu.png"), ylabel="fraction",
                         ncols=3)
  return (f"### LeNet-5, SplitLBI Mom-Wd, λ = {s.lam:g}, {s.epochs} epochs on "
          f"{s.train_examples} images (×0.1 at {s.milestones}); test on {s.eval_examples}; "
          f"mean ± sd over {s.seeds} seeds\n\n" + _table(s, results)
          + "\n![density and accuracy per epoch, mean ± sd](kappa_nu.png)\n")
