"""The Python snippets of each docs page run, in order, in one namespace, and use
the public functions that page documents."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

PAGES = {
    "toolkit.md": (17, ["support", "group_support", "sparse_params", "gamma", "find_state",
                        "penalized_leaves", "sparsity_report", "format_report",
                        "group_norms_tree", "coupling_residue", "entry_steps", "entered_by",
                        "importance_ranks", "importance_scores", "prune_to_sparsity",
                        "apply_masks", "masked_updates", "conv_input_channels",
                        "dense_neurons", "attention_heads", "channel_groups", "slim"]),
    "slimming.md": (7, ["slim", "slim_linen", "slim_nnx", "format_slim_report",
                        "coupled_channels"]),
    "growing.md": (2, ["widen_linen", "widen_state", "old_entries", "channel_groups"]),
}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_doc_snippets_run_in_order(page):
  min_blocks, names = PAGES[page]
  blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"),
                      flags=re.S)
  assert len(blocks) >= min_blocks
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/{page}[python block {i}]", "exec"), namespace)
  text = "\n".join(blocks)
  for name in names:
    assert f"sl.{name}(" in text, name
  if page == "toolkit.md":
    assert "map_penalized(" in text
