"""What a training run reports: the line after each epoch, the final accuracies
and per-layer sparsity table, the density of fixed masks, and the slim network
(pruned channels removed) with its parameters, FLOPs and test accuracy.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import optax_splitlbi as slbi
from examples import distributed, outputs
from examples.configs.base import Config
from examples.train_steps import TrainState


def mask_sparsity_report(masks: dict[str, np.ndarray], params: Any = None) -> dict:
  """Per-layer density of fixed 0/1 masks (lottery retraining).

  Args:
    masks: ``{leaf path: mask}``.
    params: the parameters; their count goes to ``total["params"]`` (which
      :func:`optax_splitlbi.format_report` prints).

  Returns:
    A report shaped like :func:`optax_splitlbi.sparsity_report`'s (one group
    per weight).
  """
  layers = {}
  for name, m in masks.items():
    nz = int(np.count_nonzero(m))
    layers[name] = dict(kind="mask", weights=int(m.size), nonzero_weights=nz,
                        weight_density=nz / m.size, groups=int(m.size), nonzero_groups=nz,
                        group_density=nz / m.size)
  w = sum(v["weights"] for v in layers.values())
  nzw = sum(v["nonzero_weights"] for v in layers.values())
  total = dict(weights=w, nonzero_weights=nzw, weight_density=nzw / max(w, 1), groups=w,
               nonzero_groups=nzw, group_density=nzw / max(w, 1))
  if params is not None:
    total["params"] = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  return {"layers": layers, "total": total}


def densities(report: dict) -> dict:
  """The epoch-row entries of a sparsity report (the report itself under ``"sparsity"``)."""
  return {"weight_density": report["total"]["weight_density"],
          "group_density": report["total"]["group_density"],
          "layer_density": {k: v["weight_density"] for k, v in report["layers"].items()},
          "sparsity": report}


def header(config: Config, info: Any, steps_per_epoch: int, n_devices: int) -> str:
  """The line printed before the first epoch."""
  return (f"{config.name}: {config.description}\n  model {config.model} on {info.name} "
          f"({info.num_train} train / {info.num_eval} test, {info.image_shape}), optimizer "
          f"{config.optimizer}, {config.epochs} epochs × {steps_per_epoch} steps, batch "
          f"{config.batch_size} on {n_devices} device(s)")


def epoch_line(row: dict) -> str:
  """The line printed after each epoch."""
  line = (f"epoch {row['epoch']:3d}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
          f"acc {row['train_accuracy']:.2%}  test acc {row['test_accuracy']:.2%}")
  if "sparse_test_accuracy" in row:
    line += (f"  sparse acc {row['sparse_test_accuracy']:.2%}  weights kept "
             f"{row['weight_density']:.1%}  groups kept {row['group_density']:.1%}")
  return line + f"  ({row['epoch_time_s']:.1f}s)"


def final(name: str, result: dict) -> str:
  """The final accuracies and, for sparse runs, the per-layer sparsity table."""
  if result.get("sparsity") is not None:
    return (f"\nFinal ({name}): dense W test accuracy {result['test_accuracy']:.2%}"
            + (f", sparse W on supp Γ {result['sparse_test_accuracy']:.2%}"
               if "sparse_test_accuracy" in result else "")
            + "\nPer-layer sparsity (nonzero / total):\n" + slbi.format_report(result["sparsity"]))
  if "test_accuracy" in result:
    return f"\nFinal ({name}): test accuracy {result['test_accuracy']:.2%}"
  return ""


def slim_architecture(config: Config, model, image_shape: tuple):
  """The slim module of ``config.mask_from`` (for ``retrain_slim``).

  The channels the mask prunes everywhere are removed
  (:func:`optax_splitlbi.slim_linen`); the run then trains this smaller
  architecture from a fresh initialisation.
  """
  if not config.mask_from:
    raise ValueError("retrain_slim needs mask_from (a search run's masks/epoch_XXXX.npz).")
  if config.init_from:
    raise ValueError("retrain_slim trains the slim architecture from scratch; unset "
                     "init_from (--set init_from=None).")
  x = jnp.zeros((2, *image_shape), jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(config.seed, impl=config.prng_impl), x,
                                         train=False))()
  masks = outputs.load_masks(os.path.expanduser(config.mask_from), variables["params"])
  return slbi.slim_linen(model, variables, masks, x, count_flops=False, verify=False,
                         train=False).module


def slim_and_evaluate(model, state: TrainState, masks: Any, sample: np.ndarray,
                      evaluate_model: Callable, result: dict,
                      say: Callable[[str], Optional[Any]] = print) -> dict:
  """Slims the final model (W on ``masks``), evaluates it, and prints parameters,
  FLOPs per example and test accuracy of the dense, masked and slim networks.

  Args:
    model, state: the trained Linen model and its train state.
    masks: supp Γ (SplitLBI) or the run's fixed mask.
    sample: an input batch (constant folding, verification, FLOPs).
    evaluate_model: ``(module, variables) -> (accuracy, loss)`` on the test set.
    result: the run's final metrics (dense / masked accuracies).
    say: where the table goes.

  Returns:
    ``{"rows": {name: (parameters, FLOPs per example, accuracy)}, "report",
    "module", "variables"}``, or ``{"error": message}`` when the masks cannot be
    slimmed (e.g. masks that do not match the params).
  """
  params, stats, masks = distributed.fetch((state.params, state.batch_stats, masks))
  variables = {"params": params, **({"batch_stats": stats} if jax.tree.leaves(stats) else {})}
  try:
    res = slbi.slim_linen(model, variables, masks, sample, train=False)
  except ValueError as e:
    say(f"\nSlimming skipped: {e}")
    return {"error": str(e)}
  acc, _ = evaluate_model(res.module, res.variables)
  rep, n = res.report, sample.shape[0]
  dense_acc = result["test_accuracy"] if "sparse_test_accuracy" in result else None
  masked_acc = result.get("sparse_test_accuracy", result["test_accuracy"])
  rows = {"dense": (rep["params"]["dense"], rep["flops"]["dense"] / n, dense_acc),
          "masked": (rep["params"]["masked"], rep["flops"]["dense"] / n, masked_acc),
          "slim": (rep["params"]["slim"], rep["flops"]["slim"] / n, acc)}
  summary = {"rows": rows, "report": rep, "module": res.module, "variables": res.variables}
  say(format_slim_summary(summary))
  return summary


def format_slim_summary(summary: dict) -> str:
  """The dense / masked / slim table printed at the end of a run."""
  lines = ["\nSlim network (pruned channels removed; docs/slimming.md):",
           f"  {'model':<8} {'parameters':>11} {'FLOPs/example':>14} {'test accuracy':>14}"]
  for name, (params, flops, acc) in summary["rows"].items():
    acc_s = "-" if acc is None else f"{acc:.2%}"
    note = "  (zeros are still multiplied)" if name == "masked" else ""
    lines.append(f"  {name:<8} {params:>11,} {flops / 1e6:>12.3f} M {acc_s:>14}{note}")
  widths = [f"{k.split('/')[-2]} {v['groups']}→{v['groups'] - v['removed']}"
            for k, v in summary["report"]["layers"].items()]
  inexact = [f for f in summary["report"]["folds"] if not f["exact"]]
  lines.append("  widths: " + ", ".join(widths))
  if inexact:
    lines.append(f"  {len(inexact)} inexact fold(s) at zero-padded convs, max error "
                 f"{max(f['max_error'] for f in inexact):.3g} (--set slim=False to skip)")
  return "\n".join(lines)
