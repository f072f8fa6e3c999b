"""optax_splitlbi: Split Linearized Bregman Iteration for JAX / optax.

SplitLBI (Fu et al., TPAMI 2022) trains a dense network with SGD-momentum cost
while a coupled sparse copy Γ of the weights walks an inverse-scale-space path
from zero; early-stopped, supp(Γ) is a "winning ticket" subnetwork.

The public API is the transform, the penalty specs and the toolkit that reads
the sparse structure out of the state. Building blocks (the proximal operators,
penalty resolution, the per-leaf update) stay in their modules:
:mod:`optax_splitlbi.prox`, :mod:`optax_splitlbi.penalties`,
:mod:`optax_splitlbi.transform`, :mod:`optax_splitlbi.masks`.
"""

from optax_splitlbi.masks import find_state, gamma, group_support, penalized_leaves, sparse_params, support
from optax_splitlbi.path import (entered_by, entry_steps, importance_ranks, importance_scores,
                                 prune_to_sparsity)
from optax_splitlbi.penalties import (ChannelGroups, GroupClass, GroupLasso, Lasso,
                                      attention_heads, by_ndim, conv_filters,
                                      conv_input_channels, default_penalty, dense_inputs,
                                      dense_neurons)
from optax_splitlbi.report import (coupling_residue, format_report, group_norms_tree,
                                   sparsity_report)
from optax_splitlbi.retrain import apply_masks, masked_updates
from optax_splitlbi.transform import ParamShape, SplitLBIState, splitlbi
from optax_splitlbi.slimming import (SlimModel, channel_groups, channel_groups_nnx,
                                     coupled_channels, format_slim_report, slim, slim_linen,
                                     slim_nnx, WideModel, widen, widen_linen, widen_nnx,
                                     widen_state, old_entries)

__version__ = "0.1.0"

__all__ = [
    # the transform and its state
    "splitlbi", "SplitLBIState",
    # penalty specs
    "Lasso", "GroupLasso", "conv_filters", "conv_input_channels", "dense_neurons",
    "dense_inputs", "attention_heads", "by_ndim", "default_penalty",
    # groups that span layers
    "channel_groups", "channel_groups_nnx", "ChannelGroups", "GroupClass",
    # reading the sparse structure
    "find_state", "support", "group_support", "sparse_params", "gamma", "penalized_leaves",
    "sparsity_report", "format_report", "group_norms_tree", "coupling_residue",
    # the regularization path
    "entry_steps", "entered_by", "importance_ranks", "importance_scores", "prune_to_sparsity",
    # retraining subnetworks
    "apply_masks", "masked_updates",
    # physical slimming: a smaller network from the masks
    "slim", "slim_linen", "slim_nnx", "SlimModel", "coupled_channels", "format_slim_report",
    # widening (growing networks): more channels, the same function
    "widen", "widen_linen", "widen_nnx", "widen_state", "old_entries", "WideModel",
]
