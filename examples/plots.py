"""PNG plots of a training run's workdir (matplotlib, no display needed).

Usage::

    python -m examples.plots WORKDIR                       # path + curves
    python -m examples.plots WORKDIR --compare SGD_WORKDIR # + SplitLBI vs SGD

Writes into ``WORKDIR/plots/`` (or ``--out``):

- ``solution_path.png``: Fig. 1-style solution path, the norm ‖Γ_g‖ of every
  conv filter g over epochs, red if the filter is in supp Γ at the end, grey
  if not; important filters pop up early (inverse scale space).
- ``curves.png``: Fig. 4-style accuracy (train, dense test, sparse test) and
  sparsity (fraction of weights / filters in supp Γ) over epochs.
- ``comparison.png``: test accuracy over epochs of several runs (SplitLBI dense
  and sparse, SGD, ...).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(workdir: str) -> list[dict]:
  """The per-epoch rows of ``workdir/metrics.jsonl``."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: train with --workdir {workdir} first.")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _name(workdir: str) -> str:
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)["name"]
  except (OSError, KeyError, ValueError):
    return os.path.basename(os.path.normpath(workdir))


def plot_solution_path(workdir: str, out: str, max_layers: int = 4) -> Optional[str]:
  """Per-filter ‖Γ_g‖ over epochs, coloured by membership of supp Γ at the end."""
  path = os.path.join(workdir, "norms.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    norms = {k[len("gamma/"):]: f[k] for k in f.files if k.startswith("gamma/")}
  if not norms:
    return None
  layers = list(norms)[:max_layers]
  fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.4), squeeze=False)
  for ax, name in zip(axes[0], layers):
    path_ = norms[name]  # (epochs + 1, groups)
    epochs = np.arange(path_.shape[0])
    selected = path_[-1] > 0
    for g in np.flatnonzero(~selected):
      ax.plot(epochs, path_[:, g], color="0.65", lw=0.8)
    for g in np.flatnonzero(selected):
      ax.plot(epochs, path_[:, g], color="tab:red", lw=1.0)
    ax.set_title(f"{name}\n{selected.sum()}/{selected.size} filters in supp Γ", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("‖Γ_g‖ (filter norm)")
  fig.suptitle(f"Solution path of Γ ({_name(workdir)}): red = selected, grey = not")
  fig.tight_layout()
  target = os.path.join(out, "solution_path.png")
  fig.savefig(target, dpi=110)
  plt.close(fig)
  return target


def plot_curves(workdir: str, out: str) -> str:
  """Accuracy and sparsity (weight / filter density of supp Γ) over epochs."""
  rows = read_metrics(workdir)
  ep = [r["epoch"] for r in rows]
  has_sparse = any("weight_density" in r for r in rows)
  fig, axes = plt.subplots(1, 2 if has_sparse else 1, figsize=(10 if has_sparse else 5, 3.6),
                           squeeze=False)
  ax = axes[0][0]
  ax.plot(ep, [r["train_accuracy"] for r in rows], label="train (W)")
  ax.plot(ep, [r["test_accuracy"] for r in rows], label="test, dense W")
  if any("sparse_test_accuracy" in r for r in rows):
    ax.plot(ep, [r.get("sparse_test_accuracy", np.nan) for r in rows],
            label="test, sparse W on supp Γ")
  ax.set_xlabel("epoch")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.02)
  ax.legend(loc="best", fontsize=8)
  ax.set_title("accuracy")
  if has_sparse:
    ax = axes[0][1]
    ax.plot(ep, [r.get("weight_density", np.nan) for r in rows], label="weights in supp Γ")
    ax.plot(ep, [r.get("group_density", np.nan) for r in rows], label="groups in supp Γ")
    layer_names = list(rows[-1].get("layer_density", {}))
    for name in layer_names:
      ax.plot(ep, [r.get("layer_density", {}).get(name, np.nan) for r in rows], lw=0.8,
              ls="--", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction nonzero")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("sparsity (density of supp Γ)")
  fig.suptitle(_name(workdir))
  fig.tight_layout()
  target = os.path.join(out, "curves.png")
  fig.savefig(target, dpi=110)
  plt.close(fig)
  return target


def plot_comparison(workdirs: Sequence[str], out: str) -> str:
  """Test accuracy over epochs of several runs (e.g. SplitLBI vs SGD)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for wd in workdirs:
    rows = read_metrics(wd)
    ep = [r["epoch"] for r in rows]
    line, = ax.plot(ep, [r["test_accuracy"] for r in rows], label=f"{_name(wd)} (dense)")
    if any("sparse_test_accuracy" in r for r in rows):
      ax.plot(ep, [r.get("sparse_test_accuracy", np.nan) for r in rows], ls="--",
              color=line.get_color(), label=f"{_name(wd)} (sparse, supp Γ)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1.02)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title("SplitLBI vs baseline: test accuracy")
  fig.tight_layout()
  target = os.path.join(out, "comparison.png")
  fig.savefig(target, dpi=110)
  plt.close(fig)
  return target


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
  parser = argparse.ArgumentParser(prog="python -m examples.plots",
                                   description="Draw PNG plots of examples.train workdirs.")
  parser.add_argument("workdir", help="a workdir written by python -m examples.train")
  parser.add_argument("--compare", nargs="*", default=[],
                      help="other workdirs (e.g. the SGD baseline) for comparison.png")
  parser.add_argument("--out", default=None, help="output directory (default WORKDIR/plots)")
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdir, "plots")
  os.makedirs(out, exist_ok=True)
  written = [plot_curves(args.workdir, out), plot_solution_path(args.workdir, out)]
  if args.compare:
    written.append(plot_comparison([args.workdir, *args.compare], out))
  written = [w for w in written if w]
  for w in written:
    print(w)
  return written


if __name__ == "__main__":
  main()
