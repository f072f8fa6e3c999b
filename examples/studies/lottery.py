"""Study 3: Fig. 5 on Fashion-MNIST: early supp Γ as winning tickets, against two controls.

Per seed and penalty (``group``: group lasso on conv filters + lasso on dense
kernels; ``lasso``: lasso everywhere):

1. ``search``: SplitLBI (Nesterov, Mom-Wd, ν = 100, the group threshold λ·√d of
   the official lottery code: the paper's lottery settings, with λ scaled to the
   budget) writes supp Γ at ``mask_epochs`` and the initial weights. Supp Γ of
   epoch 1 is still empty at this λ (only a few classifier weights).
2. ``dense``: SGD Mom-Wd trains the dense network for ``dense_epochs`` (the
   "fully trained" model of Frankle & Carbin's one-shot pruning).
3. ``retrain``: SGD Mom-Wd retrains, from the same initial weights and for
   ``retrain_epochs``, each subnet: supp Γ of epoch k (``gamma``), a random mask
   (``random``) and the magnitude-pruned dense model (``magnitude``), the
   controls keeping exactly as many filters (conv layers under group lasso) or
   weights per layer as supp Γ; plus the unpruned network (``dense``).
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from examples.configs import fashion
from examples.configs.table1 import VARIANTS
from examples.studies import common, pruning

KINDS = ("gamma", "random", "magnitude")


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int = 3
  penalties: tuple = ("group", "lasso")
  mask_epochs: tuple = (2, 3, 5, 10)
  search_epochs: int = 10
  dense_epochs: int = 10
  retrain_epochs: int = 4
  nu: float = 100.0
  lam: tuple = (("group", 0.03), ("lasso", 0.03))
  train_examples: object = 15000
  eval_examples: object = 5000


SETTINGS = {"full": Settings(),
            "smoke": Settings(seeds=1, penalties=("group",), mask_epochs=(1,), search_epochs=1,
                              dense_epochs=1, retrain_epochs=1, train_examples=256,
                              eval_examples=64)}


def _base(s: Settings, dataset: str, seed: int, **kw):
  return fashion.base("lenet5", dataset).replace(
      seed=seed, train_examples=s.train_examples, eval_examples=s.eval_examples,
      record_norms=False, schedule="constant", **kw)


def _sgd(s: Settings, dataset: str, seed: int, name: str, epochs: int):
  return _base(s, dataset, seed, **VARIANTS["sgd_mom_wd"], name=f"lottery/{name}",
               epochs=epochs)


def search_config(s: Settings, dataset: str, penalty: str, seed: int):
  return _base(s, dataset, seed, name=f"lottery/search/{penalty}", optimizer="splitlbi",
               nesterov=True, penalty=penalty, normalized=penalty == "group", nu=s.nu,
               lam=dict(s.lam)[penalty],
               epochs=s.search_epochs, save_masks_at=tuple(s.mask_epochs),
               save_params_at=(0,))


def _mask_path(runs_dir: str, penalty: str, seed: int, epoch: int) -> str:
  return os.path.join(runs_dir, f"search/{penalty}/seed{seed}", "masks", f"epoch_{epoch:04d}.npz")


def _load(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return dict(f)


def _prepare_retrain(s: Settings, penalty: str, seed: int, epoch: int, kind: str, key: str):
  def prepare(config, runs_dir):
    reference = _load(_mask_path(runs_dir, penalty, seed, epoch))
    filters = {k for k, m in reference.items() if penalty == "group" and m.ndim == 4}
    if kind == "gamma":
      masks = reference
    elif kind == "random":
      rng = np.random.default_rng([seed, epoch, zlib.crc32(penalty.encode())])
      masks = pruning.random_masks(reference, filters, rng)
    else:
      snap = _load(os.path.join(runs_dir, f"dense/seed{seed}", "snapshots",
                                f"epoch_{s.dense_epochs:04d}.npz"))
      weights = {k[len("params/"):]: v for k, v in snap.items() if k.startswith("params/")}
      masks = pruning.magnitude_masks(reference, weights, filters)
    path = os.path.join(runs_dir, key, "masks.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **masks)
    init = os.path.join(runs_dir, f"search/{penalty}/seed{seed}", "snapshots", "epoch_0000.npz")
    return config.replace(mask_from=path, init_from=init)
  return prepare


def retrain_key(penalty: str, epoch: int, kind: str, seed: int) -> str:
  return f"retrain/{penalty}/epoch{epoch}/{kind}/seed{seed}"


def runs(s: Settings, dataset: str) -> list[common.Run]:
  out = []
  for seed in common.seeds_of(s.seeds):
    out += [common.Run(f"search/{p}/seed{seed}", search_config(s, dataset, p, seed),
                       keep_files=True) for p in s.penalties]
    out.append(common.Run(f"dense/seed{seed}", _sgd(s, dataset, seed, "dense", s.dense_epochs)
                          .replace(save_params_at=(s.dense_epochs,)), keep_files=True))
    out.append(common.Run(f"retrain/dense/seed{seed}",
                          _sgd(s, dataset, seed, "retrain/dense", s.retrain_epochs)))
    for penalty in s.penalties:
      for epoch in s.mask_epochs:
        for kind in KINDS:
          key = retrain_key(penalty, epoch, kind, seed)
          out.append(common.Run(
              key, _sgd(s, dataset, seed, f"retrain/{penalty}/{kind}", s.retrain_epochs),
              prepare=_prepare_retrain(s, penalty, seed, epoch, kind, key)))
  return out


def _at(results: dict, key: str, epoch: int, metric: str) -> float:
  rows = [r for r in results[key]["history"] if r["epoch"] == epoch]
  return float("nan") if not rows or rows[0].get(metric) is None else float(rows[0][metric])


def _table(s: Settings, results: dict, penalty: str) -> tuple[str, dict]:
  seeds = common.seeds_of(s.seeds)
  rows, series = [], {k: ([], []) for k in KINDS}
  for epoch in s.mask_epochs:
    density = [common.last(results[retrain_key(penalty, epoch, "gamma", sd)], "weight_density")
               for sd in seeds]
    layers = results[retrain_key(penalty, epoch, "gamma", 0)].get("layer_density", {})
    conv = [n for n in layers if n.startswith("Conv")]
    filters = " / ".join(common.fmt((results[retrain_key(penalty, epoch, "gamma", sd)]
                                     ["layer_density"][n] for sd in seeds), digits=0)
                         for n in conv)
    accs = {k: [common.last(results[retrain_key(penalty, epoch, k, sd)], "test_accuracy")
                for sd in seeds] for k in KINDS}
    for k in KINDS:
      series[k][0].append(density)
      series[k][1].append(accs[k])
    no_retrain = [_at(results, f"search/{penalty}/seed{sd}", epoch, "sparse_test_accuracy")
                  for sd in seeds]
    rows.append([epoch, common.fmt(density), filters, common.fmt(no_retrain),
                 *[common.fmt(accs[k]) for k in KINDS]])
  header = ["Γ of epoch", "weights kept (%)", "conv layers kept (%)",
            "W on supp Γ, no retrain (%)", "retrained: supp Γ (%)", "random (%)",
            "magnitude, dense SGD (%)"]
  return common.markdown_table(header, rows), series


def report(s: Settings, results: dict, out: str) -> str:
  from examples import plots
  seeds = common.seeds_of(s.seeds)
  dense_retrain = [common.last(results[f"retrain/dense/seed{sd}"], "test_accuracy")
                   for sd in seeds]
  dense = [common.last(results[f"dense/seed{sd}"], "test_accuracy") for sd in seeds]
  text = (f"LeNet-5, search {s.search_epochs} epochs (SplitLBI Nesterov Mom-Wd, ν = {s.nu:g}, "
          f"λ = {dict(s.lam)}, group threshold λ·√d), retrain {s.retrain_epochs} epochs (SGD Mom-Wd) on "
          f"{s.train_examples} images, test on {s.eval_examples}; mean ± sd over "
          f"{s.seeds} seeds. Unpruned network retrained identically: "
          f"{common.fmt(dense_retrain)} %; the dense SGD model pruned for the magnitude "
          f"control ({s.dense_epochs} epochs): {common.fmt(dense)} %.\n\n")
  panels = {}
  for penalty in s.penalties:
    table, series = _table(s, results, penalty)
    name = "filters (group lasso on conv, lasso on dense)" if penalty == "group" else (
        "weights (lasso everywhere)")
    text += f"### {name}\n\n{table}\n"
    panels[name] = {k: (np.array(d), np.array(a)) for k, (d, a) in series.items()}
  plots.plot_accuracy_vs_density(panels, os.path.join(out, "lottery.png"),
                                 reference=float(np.mean(dense_retrain)))
  return text + "![retrained accuracy against the fraction of weights kept](lottery.png)\n"
