"""``slim`` (any forward function) and ``coupled_channels``: the stages in order.

``slim`` runs one stage after the other, each handing the next one value::

  program (program.trace) → graph (graph.build_graph) → classes (plan.group_classes)
  → decision (plan.decide) → folds (fold.fold_removed, which redecides with
  ``inexact="keep"``) → slim program (replay.slim_program)

and reports on them (report.py). ``slim_linen`` / ``slim_nnx`` (frameworks.py)
rebuild the module around it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from optax_splitlbi.slimming import fold as fold_lib
from optax_splitlbi.slimming import masks as masks_lib
from optax_splitlbi.slimming import plan as plan_lib
from optax_splitlbi.slimming import replay
from optax_splitlbi.slimming import report as report_lib
from optax_splitlbi.slimming.graph import build_graph
from optax_splitlbi.slimming.masks import leaf_masks, leaf_paths
from optax_splitlbi.slimming.program import trace

_POLICIES = ("fold", "keep")


@dataclasses.dataclass(frozen=True)
class SlimModel:
  """A slimmed network.

  Attributes:
    variables: the slim variables, in the structure of the input ``variables``
      (masked weights, removed channels cut, constants folded into biases).
    apply_fn: jitted ``apply_fn(variables, x)`` running the slim network; works
      for any model the analysis understands (it replays the traced forward pass
      at the slim shapes) and is differentiable.
    report: see :func:`format_slim_report` (``layers``, ``folds``, ``params``,
      ``flops``, ``max_abs_diff``).
    kept: per variable leaf (the input structure), a tuple with, per axis, the
      kept indices (``None``: all kept); see :meth:`cut`.
    module: the slim Linen / NNX module (``slim_linen`` / ``slim_nnx``), else ``None``.
  """

  variables: Any
  apply_fn: Callable
  report: dict
  kept: Any
  module: Any = None

  def cut(self, tree: Any) -> Any:
    """Cuts a tree shaped like the dense variables (masks, a gradient, an optimizer
    state's buffers) to the slim shapes with ``kept``."""
    def one(x, kept):
      x = np.asarray(x)
      for axis, k in enumerate(kept):
        x = x if k is None else np.take(x, k, axis=axis)
      return x
    return jax.tree.map(one, tree, self.kept)


def slim(apply_fn: Callable[[Any, Any], Any], variables: Any, masks: Any, sample_input: Any,
         *, inexact: str = "fold", count_flops: bool = True, verify: bool = True,
         round_to: int = 1) -> SlimModel:
  """Removes the pruned channels of a network: a smaller network, same outputs.

  The forward pass ``apply_fn(variables, sample_input)`` is traced to a jaxpr;
  a dependency analysis over its dimensions finds which parameter axes share a
  channel index (through residual adds, concatenations, flattens, grouped convs,
  attention heads). A channel is removed where every layer that produces it has
  its filter / neuron / head pruned by ``masks`` (or every layer that reads it
  has the matching inputs pruned); its constant value in the masked model is
  folded into the next layer's bias or BatchNorm mean. The slim network
  computes the masked dense network W ∘ mask (BatchNorm as in ``apply_fn``).

  Args:
    apply_fn: ``(variables, x) -> outputs``; for Linen e.g.
      ``lambda v, x: model.apply(v, x, train=False)``.
    variables: the model's variables (any pytree; Linen: ``{"params": ...,
      "batch_stats": ...}``).
    masks: bool masks (True = kept) with the structure of ``variables`` or of
      ``variables["params"]``: full-shape (``support``, ``entered_by``,
      ``prune_to_sparsity``) or per-group keepdims (``group_support``); ``None``
      for unmasked leaves. A lasso mask counts as pruning a neuron when its whole
      slice is pruned.
    sample_input: an input batch (leading axis: batch); used for tracing, for
      the constant folding and to measure the slim model against the masked one.
    inexact: ``"fold"``: a removed constant channel that reaches a consumer
      where it is not the same at every position (a zero-padded conv) is folded
      at the central position and reported with its error; ``"keep"``: such
      channels are kept instead, so the slim model is exact.
    count_flops: add XLA's FLOP counts of the dense and slim forward passes
      (at the batch size of ``sample_input``).
    verify: run the slim network on (up to 4 examples of) ``sample_input`` and
      report its largest difference from the masked model (``max_abs_diff``).
    round_to: keep a multiple of this many channels in every class that loses
      some (pruned channels are kept back, lowest index first; still exact).
      Accelerators and XLA:CPU run odd channel counts slowly: 8 is a good value
      for GPUs (benchmarks/results/RESULTS.md).

  Returns:
    A :class:`SlimModel`.

  Raises:
    ValueError: masks that do not match the variables (naming the leaf), or a
      channel to remove that an operation the analysis does not know uses (naming
      the primitive and layer). A mask may prune every channel of a layer: the
      slim layer has width zero (see :func:`optax_splitlbi.slimming.plan.decide`).
  """
  _check_options(inexact, round_to)
  leaves, treedef = jax.tree.flatten(variables)
  names = leaf_paths(variables)
  masks_ = leaf_masks(variables, masks)  # leaf index → full-shape bool
  masked = masks_lib.masked_leaves(leaves, masks_)
  prog = trace(apply_fn, treedef.unflatten(masked), sample_input)  # program
  cls = plan_lib.group_classes(build_graph(prog))  # graph → classes
  batch = replay.batch_axis(prog, cls)
  probe = replay.sub_batch(sample_input, batch.resizable)  # the folds' and checks' input
  decide = functools.partial(plan_lib.decide, cls, masks_, names, round_to=round_to)
  folding = fold_lib.fold_removed(prog, cls, decide, masked, jax.tree.leaves(probe), batch,
                                  keep_inexact=inexact == "keep")  # decision → folds
  small = replay.slim_program(prog, cls, folding.decision.keep, folding.leaves, batch)
  slim_vars = treedef.unflatten(jax.device_put(small.leaves))
  shapes = ([np.shape(x) for x in leaves], [x.shape for x in small.leaves])
  report = dict(
      layers=report_lib.layer_report(cls, masks_, folding.decision, names, shapes),
      folds=report_lib.fold_report(folding.folds, names),
      params=report_lib.param_counts(variables, treedef.unflatten(masked), slim_vars),
      max_abs_diff=replay.max_diff(jax.tree.leaves(small.apply(slim_vars, probe)),
                                   folding.reference) if verify else None,
      max_abs_output=report_lib.max_abs(folding.reference),
      batch_resizable=batch.resizable,
      flops=report_lib.flop_counts(apply_fn, variables, small.apply, slim_vars, sample_input)
      if count_flops else None)
  return SlimModel(slim_vars, small.apply, report, treedef.unflatten(small.kept))


def _check_options(inexact: str, round_to: int) -> None:
  if inexact not in _POLICIES:
    raise ValueError(f"inexact must be one of {_POLICIES}, got {inexact!r}.")
  if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
    raise ValueError(f"slim: round_to must be a positive int, got {round_to!r}.")


def coupled_channels(apply_fn: Callable[[Any, Any], Any], variables: Any,
                     sample_input: Any) -> list[list[tuple[str, int]]]:
  """Which parameter axes produce the same channels (the coupling ``slim`` respects).

  Each group lists ``(variable path, axis)`` of the kernels whose output axis
  indexes one channel space: a plain layer alone, the stem / projection and the
  last conv of every block of a residual stage together. A channel of a group
  can be removed only if every kernel of the group prunes it, so masks that agree
  within each group (e.g. one importance ranking per group) slim further.

  Args:
    apply_fn, variables, sample_input: as for :func:`slim`.

  Returns:
    The groups, each sorted, in the order of their first kernel.
  """
  prog = trace(apply_fn, variables, sample_input)
  cls = plan_lib.group_classes(build_graph(prog))
  paths = leaf_paths(variables)
  groups = [sorted({(paths[s.leaf], s.axis) for s in sites if s.leaf is not None})
            for sites in cls.producers.values()]
  return sorted((g for g in groups if g), key=lambda g: paths.index(g[0][0]))
