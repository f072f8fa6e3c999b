"""Study 4: Fig. 1 on Fashion-MNIST: the filter solution path of LeNet-5 with κ = 10.

SplitLBI Mom-Wd (κ = 10, κα = 0.1) records every ``steps_per_point`` steps the
norm ‖Γ_g‖ and ‖W_g‖ of each conv filter g; SGD Mom-Wd from the same
initialisation records its filters' ‖W_g‖. The plots draw the path of the conv
layer ``layer`` (red: in supp Γ at the end, grey: not) and the learned filters
as images.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from examples.configs import fashion
from examples.configs.table1 import VARIANTS
from examples.studies import common


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 3
  kappa: float = 10.0
  nu: float = 10.0
  lam: float = 1.0
  steps_per_point: int = 50
  points: int = 40
  layer: str = "Conv_1"
  eval_examples: object = 2000


SETTINGS = {"full": Settings(),
            "smoke": Settings(seeds=1, steps_per_point=2, points=2, eval_examples=64)}


def _base(s: Settings, dataset: str, seed: int, name: str, **kw):
  return fashion.base("lenet5", dataset).replace(
      name=f"path/{name}", seed=seed, epochs=s.points, max_steps_per_epoch=s.steps_per_point,
      schedule="constant", eval_examples=s.eval_examples, **kw)


def runs(s: Settings, dataset: str) -> list[common.Run]:
  out = []
  for seed in common.seeds_of(s.seeds):
    out.append(common.Run(f"splitlbi/seed{seed}", _base(
        s, dataset, seed, "splitlbi", kappa=s.kappa, learning_rate=0.1 / s.kappa, nu=s.nu,
        lam=s.lam, save_params_at=(s.points,)), keep_files=True))
  out.append(common.Run("sgd/seed0", _base(
      s, dataset, 0, "sgd", **VARIANTS["sgd_mom_wd"], save_params_at=tuple(range(s.points + 1))),
      keep_files=True))
  return out


def _norms(runs_dir: str, key: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(runs_dir, key, "norms.npz")) as f:
    return dict(f)


def _snapshot(runs_dir: str, key: str, epoch: int) -> dict[str, np.ndarray]:
  with np.load(os.path.join(runs_dir, key, "snapshots", f"epoch_{epoch:04d}.npz")) as f:
    return {k[len("params/"):]: v for k, v in f.items() if k.startswith("params/")}


def sgd_filter_norms(runs_dir: str, key: str, points: int, layer: str) -> np.ndarray:
  """(points + 1, filters) ‖W_g‖ of an SGD run's snapshots."""
  rows = []
  for e in range(points + 1):
    w = _snapshot(runs_dir, key, e)[f"{layer}/kernel"]
    rows.append(np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0))
  return np.stack(rows)


def entry_points(gamma_norms: np.ndarray) -> np.ndarray:
  """Per filter, the first recorded point with ‖Γ_g‖ > 0 (-1: never)."""
  nonzero = gamma_norms > 0
  return np.where(nonzero.any(0), nonzero.argmax(0), -1)


def _seed_row(s: Settings, results: dict, runs_dir: str, seed: int) -> list:
  key = f"splitlbi/seed{seed}"
  norms = _norms(runs_dir, key)
  row = [seed]
  for layer in ("Conv_0", "Conv_1"):
    gamma = norms[f"gamma/{layer}/kernel"]
    row.append(f"{int((gamma[-1] > 0).sum())}/{gamma.shape[1]}")
  entries = entry_points(norms[f"gamma/{s.layer}/kernel"])
  steps = sorted(int(e) * s.steps_per_point for e in entries if e >= 0)
  r = results[key]
  row += [", ".join(map(str, steps)) or "none",
          f"{100 * common.last(r, 'test_accuracy'):.2f}",
          f"{100 * common.last(r, 'sparse_test_accuracy'):.2f}",
          f"{100 * common.last(r, 'weight_density'):.2f}"]
  return row


def report(s: Settings, results: dict, out: str) -> str:
  from examples import plots
  runs_dir = os.path.join(out, "runs")
  rows = [_seed_row(s, results, runs_dir, sd) for sd in common.seeds_of(s.seeds)]
  header = ["seed", "Conv_0 filters in supp Γ", "Conv_1 filters in supp Γ",
            f"steps at which {s.layer} filters entered", "test acc, W (%)",
            "W on supp Γ (%)", "weights in supp Γ (%)"]
  norms = _norms(runs_dir, "splitlbi/seed0")
  gamma, weight = norms[f"gamma/{s.layer}/kernel"], norms[f"weight/{s.layer}/kernel"]
  selected = gamma[-1] > 0
  sgd = sgd_filter_norms(runs_dir, "sgd/seed0", s.points, s.layer)
  steps = np.arange(s.points + 1) * s.steps_per_point
  plots.plot_filter_paths({
      f"SplitLBI ‖Γ_g‖, {s.layer}": (steps, gamma, selected),
      f"SplitLBI ‖W_g‖, {s.layer}": (steps, weight, selected),
      f"SGD Mom-Wd ‖W_g‖, {s.layer}": (steps, sgd, selected)},
      os.path.join(out, "path.png"))
  slbi_w = _snapshot(runs_dir, "splitlbi/seed0", s.points)
  sgd_w = _snapshot(runs_dir, "sgd/seed0", s.points)
  sel0 = norms["gamma/Conv_0/kernel"][-1] > 0
  plots.plot_filter_images({
      "SplitLBI W, Conv_0": (slbi_w["Conv_0/kernel"], sel0),
      "SGD W, Conv_0": (sgd_w["Conv_0/kernel"], None),
      f"SplitLBI W, {s.layer}": (slbi_w[f"{s.layer}/kernel"], selected),
      f"SGD W, {s.layer}": (sgd_w[f"{s.layer}/kernel"], None)},
      os.path.join(out, "filters.png"))
  sgd_acc = common.last(results["sgd/seed0"], "test_accuracy")
  return (f"### LeNet-5, SplitLBI Mom-Wd κ = {s.kappa:g}, α = {0.1 / s.kappa:g}, ν = {s.nu:g}, "
          f"λ = {s.lam:g}; {s.points} points of {s.steps_per_point} steps "
          f"({s.points * s.steps_per_point} steps of batch 128); test on {s.eval_examples}\n\n"
          + common.markdown_table(header, rows)
          + f"\nSGD Mom-Wd (seed 0), same steps and initialisation: {100 * sgd_acc:.2f} %.\n\n"
          "![filter solution path: red = in supp Γ at the end](path.png)\n\n"
          "![learned filters (seed 0); red frame: in supp Γ](filters.png)\n")
