"""optax_splitlbi: Split Linearized Bregman Iteration for JAX / optax.

SplitLBI (Fu et al., TPAMI 2022) trains a dense network with SGD-momentum cost
while a coupled sparse copy Γ of the weights walks an inverse-scale-space path
from zero; early-stopped, supp(Γ) is a "winning ticket" subnetwork.
"""

from optax_splitlbi.masks import (find_state, gamma, group_support, hyperparams, map_penalized,
                                  penalized_leaves, sparse_params, support)
from optax_splitlbi.path import (entered_by, entry_steps, importance_ranks, importance_scores,
                                 prune_to_sparsity)
from optax_splitlbi.report import (coupling_residue, format_report, group_norms_tree,
                                   sparsity_report)
from optax_splitlbi.retrain import MaskedUpdatesState, apply_masks, masked_updates
from optax_splitlbi.penalties import (GroupLasso, Lasso, LeafPenalty, attention_heads,
                                      by_ndim, conv_filters, conv_input_channels,
                                      default_penalty, dense_inputs, dense_neurons, resolve_leaf,
                                      path_str, resolve_penalties)
from optax_splitlbi.prox import (group_map, group_norms, group_soft_threshold, penalty_norms,
                                 prox, soft_threshold)
from optax_splitlbi.transform import SplitLBIState, StaticHyperparams, splitlbi
from optax_splitlbi.slimming import (SlimModel, coupled_channels, format_slim_report, slim,
                                     slim_linen, slim_nnx)

__version__ = "0.1.0"

__all__ = [
    "GroupLasso", "Lasso", "LeafPenalty", "SplitLBIState", "StaticHyperparams",
    "attention_heads", "by_ndim", "conv_filters", "conv_input_channels",
    "default_penalty", "dense_inputs", "dense_neurons", "find_state", "gamma",
    "group_map", "group_norms", "group_soft_threshold", "map_penalized",
    "path_str", "penalty_norms", "prox", "resolve_leaf", "resolve_penalties", "soft_threshold", "sparse_params",
    "splitlbi", "support",
    # structural sparsity toolkit (masks, report, path, retrain)
    "MaskedUpdatesState", "apply_masks", "coupling_residue", "entered_by", "entry_steps",
    "format_report", "group_norms_tree", "group_support", "hyperparams", "importance_ranks",
    "importance_scores", "masked_updates", "penalized_leaves", "prune_to_sparsity",
    "sparsity_report",
    # physical slimming (slimming/)
    "SlimModel", "coupled_channels", "format_slim_report", "slim", "slim_linen", "slim_nnx",
]
