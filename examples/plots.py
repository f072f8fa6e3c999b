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
import matplotlib.ticker  # noqa: E402
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


# ------------------------------------------------------------ study plots (examples.study)


def _save(fig, target: str, dpi: int = 80) -> str:
  os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
  fig.savefig(target, dpi=dpi)
  plt.close(fig)
  return target


def _grid(n: int, ncols: int, size=(3.2, 2.6)):
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                           squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  return fig, list(axes.flat)


def plot_loss_traces(panels: dict[str, Sequence[Sequence[float]]], target: str,
                     ncols: int = 4) -> str:
  """One panel per title: the per-step training loss of every seed (one line each)."""
  fig, axes = _grid(len(panels), ncols)
  for ax, (title, traces) in zip(axes, panels.items()):
    for trace in traces:
      y = np.array([np.nan if v is None else v for v in trace], np.float64)
      ax.plot(np.arange(1, len(y) + 1), y, lw=0.8)
    ax.axhline(np.log(10), color="0.5", ls=":", lw=0.8)
    ax.set_ylim(0, 5)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("train loss", fontsize=8)
  fig.suptitle("per-step training loss, one line per seed (dotted: ln 10, chance)", fontsize=9)
  fig.tight_layout()
  return _save(fig, target)


def plot_errorbars(panels: dict[str, Sequence[tuple[str, Sequence[float]]]], target: str,
                   ylabel: str, scale: float = 1.0, ncols: int = 2) -> str:
  """One panel per title: every seed's value (dots) and mean ± sd (bar) per label."""
  fig, axes = _grid(len(panels), ncols, size=(5.0, 3.4))
  for ax, (title, points) in zip(axes, panels.items()):
    for i, (label, values) in enumerate(points):
      v = scale * np.asarray(values, np.float64)
      color = "tab:red" if "splitlbi" in label.lower() else "tab:blue"
      ax.plot(np.full(v.shape, i), v, ".", color=color, alpha=0.5)
      if v.size:
        ax.errorbar(i, v.mean(), yerr=v.std(ddof=1) if v.size > 1 else 0, fmt="_",
                    color=color, capsize=4, ms=14)
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels([p[0] for p in points], rotation=40, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
  fig.tight_layout()
  return _save(fig, target)


def plot_mean_curves(panels: dict[str, dict[str, np.ndarray]], target: str, ylabel: str,
                     xlabel: str = "epoch", ncols: int = 2, ylim=None,
                     logy: bool = False) -> str:
  """One panel per title; per label the mean over seeds (rows of the array) ± sd band."""
  fig, axes = _grid(len(panels), ncols, size=(4.4, 3.2))
  for ax, (title, curves) in zip(axes, panels.items()):
    for label, runs in curves.items():
      runs = np.atleast_2d(np.asarray(runs, np.float64))
      x = np.arange(1, runs.shape[1] + 1)
      mean, sd = np.nanmean(runs, 0), (np.nanstd(runs, 0, ddof=1) if len(runs) > 1
                                       else np.zeros(runs.shape[1]))
      line, = ax.plot(x, mean, lw=1.2, label=label)
      ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
    if logy:
      ax.set_yscale("log")
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  return _save(fig, target)


def plot_accuracy_vs_density(panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
                             target: str, reference: Optional[float] = None) -> str:
  """One panel per title; per label accuracy (rows: points, columns: seeds) against
  density, mean ± sd both ways; ``reference``: a horizontal line (unpruned)."""
  fig, axes = _grid(len(panels), 2, size=(4.6, 3.4))
  for ax, (title, series) in zip(axes, panels.items()):
    for label, (density, acc) in series.items():
      d, a = 100 * np.asarray(density, np.float64), 100 * np.asarray(acc, np.float64)
      sd = (lambda v: v.std(1, ddof=1) if v.shape[1] > 1 else np.zeros(len(v)))
      ax.errorbar(d.mean(1), a.mean(1), xerr=sd(d), yerr=sd(a), marker="o", ms=4,
                  capsize=3, lw=1, label=label)
    if reference is not None:
      ax.axhline(100 * reference, color="0.4", ls="--", lw=0.8, label="unpruned")
    if all(np.all(np.asarray(d) > 0) for d, _ in series.values()):
      ax.set_xscale("log")  # plain numbers at 1, 2, 5 × 10^k, no minor labels
      ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
      ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("weights kept (%)", fontsize=8)
    ax.set_ylabel("test accuracy after retraining (%)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return _save(fig, target)


def plot_filter_paths(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      target: str) -> str:
  """Per title ``(steps, norms (points, filters), selected (filters,))``: one line per
  filter, red if selected, grey if not (Fig. 1)."""
  fig, axes = _grid(len(panels), 3, size=(3.8, 3.0))
  for ax, (title, (steps, norms, selected)) in zip(axes, panels.items()):
    for g in np.flatnonzero(~selected):
      ax.plot(steps, norms[:, g], color="0.65", lw=0.8)
    for g in np.flatnonzero(selected):
      ax.plot(steps, norms[:, g], color="tab:red", lw=1.0)
    ax.set_title(f"{title} ({int(selected.sum())}/{selected.size} red)", fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("filter norm", fontsize=8)
  fig.tight_layout()
  return _save(fig, target)


def _filter_strip(kernel: np.ndarray, o: int) -> np.ndarray:
  """Filter ``o`` of an HWIO kernel as one image: its input channels side by side."""
  k = kernel[..., o]
  h, w, i = k.shape
  pad = np.full((h, 1), np.nan)
  return np.concatenate([x for c in range(i) for x in (k[:, :, c], pad)][:-1], axis=1)


def plot_filter_images(panels: dict[str, tuple[np.ndarray, Optional[np.ndarray]]],
                       target: str) -> str:
  """Per title ``(HWIO kernel, selected (O,) or None)``: every output filter drawn as an
  image (input channels side by side), selected ones framed in red."""
  fig = plt.figure(figsize=(7.5, 1.0 + 0.32 * sum(k.shape[-1] for k, _ in panels.values())))
  sub = fig.subfigures(len(panels), 1, height_ratios=[k.shape[-1] + 2 for k, _ in
                                                      panels.values()])
  for sf, (title, (kernel, selected)) in zip(np.atleast_1d(sub), panels.items()):
    n = kernel.shape[-1]
    cols = 8 if kernel.shape[2] == 1 else 2
    axes = sf.subplots(-(-n // cols), cols, squeeze=False)
    lim = float(np.abs(kernel).max()) or 1.0
    for o, ax in enumerate(axes.flat):
      ax.set_xticks([])
      ax.set_yticks([])
      if o >= n:
        ax.axis("off")
        continue
      ax.imshow(_filter_strip(kernel, o), cmap="RdBu_r", vmin=-lim, vmax=lim)
      on = selected is not None and bool(selected[o])
      for spine in ax.spines.values():
        spine.set_edgecolor("tab:red" if on else "0.8")
        spine.set_linewidth(2.0 if on else 0.5)
    sf.suptitle(title, fontsize=8)
  return _save(fig, target)


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
