"""Study 5: stability of the paper's defaults across learning rates and initialisations.

Two parts, on LeNet-5:

- **sweep**: short runs (``steps`` steps, every step's loss kept) of SGD Mom-Wd,
  SplitLBI Mom-Wd and Adam at the paper's rate × each multiplier, over seeds,
  without and with a linear warm-up; a run is *dead* when its test accuracy
  after the run is below 20 % (chance: 10 %) or its loss is not finite. The
  SGD and SplitLBI cells at ×1 and ×2 are also run from the Flax-default and He
  initialisations.
- **defaults**: the paper's defaults (lr 0.1, momentum 0.9, wd 1e-4, κ 1, ν 10,
  λ 1, no warm-up) trained for ``epochs`` epochs from each initialisation.
- **coupling**: study 1's LeNet-5 SplitLBI runs (``fashion/lenet5/<variant>``)
  with a larger ν. Outside supp Γ the coupling pulls W to 0 by (κα/ν)·W per
  step, outside the momentum buffer: without momentum that is a weight decay of
  1/ν relative to the gradient step (0.1 at ν = 10, 1000× the paper's 1e-4).
"""

from __future__ import annotations

import dataclasses
import os

from examples.configs import fashion
from examples.configs.base import Config
from examples.configs.table1 import VARIANTS
from examples.studies import common, inits, traces

SWEEP_OPTIMIZERS = ("sgd_mom_wd", "splitlbi_mom_wd", "adam")
PAIR = ("sgd_mom_wd", "splitlbi_mom_wd")


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 5
  seeds_at_paper_rate: int = 10  # SGD / SplitLBI Mom-Wd at lr 0.1, project init
  steps: int = 200
  multipliers: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)
  warmup_steps: int = fashion.WARMUP_STEPS
  init_multipliers: tuple = (1.0, 2.0)
  default_seeds: int = 3
  default_epochs: int = 2
  coupling: tuple = (("splitlbi_naive", 100.0), ("splitlbi_naive", 1000.0),
                     ("splitlbi_mom_wd", 100.0))
  coupling_seeds: int = 3
  train_examples: object = None
  eval_examples: int = 2000


SETTINGS = {"full": Settings(),
            "smoke": Settings(seeds=1, seeds_at_paper_rate=1, steps=3, multipliers=(1.0,), init_multipliers=(1.0,),
                              default_seeds=1, default_epochs=1, train_examples=256,
                              eval_examples=64, coupling=(("splitlbi_naive", 100.0),),
                              coupling_seeds=1)}


def _config(s: Settings, dataset: str, variant: str, mult: float, seed: int,
            warmup: bool) -> Config:
  c = fashion.variant("lenet5", variant, dataset)
  return c.replace(
      name=f"sensitivity/{variant}", learning_rate=c.learning_rate * mult, seed=seed,
      warmup_steps=s.warmup_steps if warmup else 0, schedule="constant", epochs=1,
      max_steps_per_epoch=s.steps, train_examples=s.train_examples,
      eval_examples=s.eval_examples, eval_batch_size=min(1000, s.eval_examples))


def _with_init(run_key: str, scheme: str):
  def prepare(config: Config, runs_dir: str) -> Config:
    return inits.write_init(config, scheme, os.path.join(runs_dir, run_key, "init.npz"))
  return prepare


def cell_seeds(s: Settings, variant: str, scheme: str, mult: float) -> tuple[int, ...]:
  """Seeds of a sweep cell: more at the paper's rate, where it matters most."""
  more = variant in PAIR and scheme == "project" and mult == 1.0
  return common.seeds_of(max(s.seeds, s.seeds_at_paper_rate) if more else s.seeds)


def sweep_key(variant: str, warmup: bool, scheme: str, mult: float, seed: int) -> str:
  return f"sweep/{variant}{'+warmup' if warmup else ''}/{scheme}/x{mult:g}/seed{seed}"


def runs(s: Settings, dataset: str) -> list[common.Run]:
  out = []
  cells = [(v, False, "project", m) for v in SWEEP_OPTIMIZERS for m in s.multipliers]
  cells += [(v, True, "project", m) for v in PAIR for m in s.multipliers]
  cells += [(v, False, sc, m) for sc in ("flax", "he") for v in PAIR for m in s.init_multipliers]
  for variant, warmup, scheme, mult in cells:
    for seed in cell_seeds(s, variant, scheme, mult):
      key = sweep_key(variant, warmup, scheme, mult, seed)
      out.append(common.Run(key, _config(s, dataset, variant, mult, seed, warmup),
                            prepare=_with_init(key, scheme), execute=traces.trace_run))
  for scheme in inits.SCHEMES:
    for variant in PAIR:
      for seed in common.seeds_of(s.default_seeds):
        key = f"defaults/{variant}/{scheme}/seed{seed}"
        c = fashion.variant("lenet5", variant, dataset).replace(
            name=f"sensitivity/defaults/{variant}", seed=seed,
            warmup_steps=0, schedule="constant", epochs=s.default_epochs,
            train_examples=s.train_examples, eval_examples=s.eval_examples)
        out.append(common.Run(key, c, prepare=_with_init(key, scheme)))
  return out + _coupling_runs(s, dataset)


def _coupling_runs(s: Settings, dataset: str) -> list[common.Run]:
  out = []
  for variant, nu in s.coupling:
    for seed in common.seeds_of(s.coupling_seeds):
      c = fashion.variant("lenet5", variant, dataset).replace(
          name=f"sensitivity/coupling/{variant}", nu=nu, seed=seed)
      if s.train_examples:  # smoke
        c = c.replace(epochs=1, train_examples=s.train_examples, eval_examples=s.eval_examples)
      out.append(common.Run(f"coupling/{variant}/nu{nu:g}/seed{seed}", c))
  return out


def _cell(results: dict, s: Settings, variant: str, warmup: bool, scheme: str,
          mult: float) -> list[dict]:
  keys = [sweep_key(variant, warmup, scheme, mult, seed)
          for seed in cell_seeds(s, variant, scheme, mult)]
  return [results[k] for k in keys if k in results]


def largest_stable(dead_by_mult: dict[float, int]) -> float:
  """The largest multiplier up to which (from the smallest) no seed died; 0 if none."""
  best = 0.0
  for mult in sorted(dead_by_mult):
    if dead_by_mult[mult]:
      break
    best = mult
  return best


def _sweep_table(results: dict, s: Settings) -> str:
  rows = []
  for variant, warmup in [(v, False) for v in SWEEP_OPTIMIZERS] + [(v, True) for v in PAIR]:
    base_lr = VARIANTS[variant].get("learning_rate", fashion.PAPER["learning_rate"])
    dead, cells = {}, []
    for mult in s.multipliers:
      rs = _cell(results, s, variant, warmup, "project", mult)
      dead[mult] = sum(bool(r["dead"]) for r in rs)
      cells.append(f"{dead[mult]}/{len(rs)}")
    best = largest_stable(dead)
    name = variant + (f" + warm-up {s.warmup_steps}" if warmup else "")
    rows.append([name, *cells, f"{best * base_lr:g}" if best else "none"])
  header = ["optimizer", *[f"×{m:g}" for m in s.multipliers], "largest stable lr"]
  return common.markdown_table(header, rows)


def _init_table(results: dict, s: Settings) -> str:
  rows = []
  for scheme in inits.SCHEMES:
    row = [scheme]
    for variant in PAIR:
      for mult in s.init_multipliers:
        rs = _cell(results, s, variant, False, scheme, mult)
        row.append(f"{sum(bool(r['dead']) for r in rs)}/{len(rs)}")
    for variant in PAIR:
      rs = [results[k] for k in results
            if k.startswith(f"defaults/{variant}/{scheme}/")]
      row.append(common.fmt(common.last(r, "test_accuracy") for r in rs))
      row.append(f"{sum(common.last(r, 'test_accuracy') < traces.DEAD_ACCURACY for r in rs)}"
                 f"/{len(rs)}")
    rs = [results[k] for k in results if k.startswith(f"defaults/splitlbi_mom_wd/{scheme}/")]
    row.append(common.fmt(common.last(r, "sparse_test_accuracy") for r in rs))
    rows.append(row)
  header = (["init"] + [f"{'SGD' if v.startswith('sgd') else 'SplitLBI'} dead, lr {0.1 * m:g}"
                        for v in PAIR for m in s.init_multipliers]
            + [f"{w} {x}" for w in ("SGD", "SplitLBI") for x in
               (f"test acc after {s.default_epochs} ep", "dead")]
            + ["SplitLBI sparse acc"])
  return common.markdown_table(header, rows)


def report(s: Settings, results: dict, out: str) -> str:
  from examples import plots
  panels = {}
  for mult in sorted(set(s.multipliers) & {1.0, 2.0}):
    for variant, warmup in [(v, False) for v in PAIR] + [(v, True) for v in PAIR]:
      title = (f"{'SGD' if variant.startswith('sgd') else 'SplitLBI'} Mom-Wd, lr {0.1 * mult:g}"
               + (f", warm-up {s.warmup_steps}" if warmup else ""))
      panels[title] = [r["losses"] for r in _cell(results, s, variant, warmup, "project", mult)]
  plots.plot_loss_traces(panels, os.path.join(out, "loss_traces.png"), ncols=4)
  rows = []
  for variant, nu in s.coupling:
    rs = [results[f"coupling/{variant}/nu{nu:g}/seed{sd}"]
          for sd in common.seeds_of(s.coupling_seeds)]
    rows.append([variant, f"{nu:g}", *[common.fmt(common.last(r, m) for r in rs) for m in
                                        ("test_accuracy", "sparse_test_accuracy",
                                         "weight_density")]])
  coupling = common.markdown_table(
      ["variant", "ν", "test acc, W (%)", "W on supp Γ (%)", "weights in supp Γ (%)"], rows)
  return ("### Dead runs out of seeds, by learning rate (× the paper's rate: 0.1, Adam 1e-3)\n\n"
          f"{s.steps} steps of batch 128 each, project initialisation.\n\n"
          + _sweep_table(results, s)
          + "\n### Initialisations: dead runs (sweep) and the paper's defaults trained "
          f"{s.default_epochs} epochs (mean ± sd over {s.default_seeds} seeds)\n\n"
          + _init_table(results, s)
          + "\n![per-step training loss](loss_traces.png)\n"
          + "\n### Study 1's SplitLBI runs with a larger ν (LeNet-5, 5 epochs; mean ± sd "
          f"over {s.coupling_seeds} seeds)\n\n" + coupling)
