"""Physical slimming: from supp(Γ) to a smaller, faster network.

``slim`` traces a model's forward pass, finds which parameter axes share a
channel (a dependency analysis over the jaxpr's dimensions, like DepGraph for
PyTorch), removes the channels the masks prune everywhere, folds their constant
values into the next biases, and returns the slim variables plus a jitted slim
forward function. ``slim_linen`` / ``slim_nnx`` also rebuild the module.
``channel_groups`` turns the same analysis into a SplitLBI penalty whose groups
are the removable channels (one group lasso across every layer of a channel).
``widen`` is the inverse: more channels, the same function (growing networks).
See docs/slimming.md.
"""

from optax_splitlbi.slimming.api import SlimModel, coupled_channels, slim
from optax_splitlbi.slimming.frameworks import slim_linen, slim_nnx
from optax_splitlbi.slimming.groups import channel_groups, channel_groups_nnx
from optax_splitlbi.slimming.masks import leaf_masks
from optax_splitlbi.slimming.report import format_slim_report
from optax_splitlbi.slimming.widen import WideModel, widen, widen_linen, widen_nnx, widen_state, old_entries

__all__ = ["SlimModel", "channel_groups", "channel_groups_nnx", "coupled_channels",
           "format_slim_report", "leaf_masks", "slim", "slim_linen", "slim_nnx", "WideModel",
           "widen", "widen_linen", "widen_nnx", "widen_state", "old_entries"]
