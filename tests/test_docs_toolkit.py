"""The Python snippets of docs/toolkit.md run, in order, in one namespace."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "toolkit.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_toolkit_doc_snippets_run_in_order():
  assert len(BLOCKS) >= 15
  namespace = {}
  for i, block in enumerate(BLOCKS):
    exec(compile(block, f"docs/toolkit.md[python block {i}]", "exec"), namespace)
  # Every public toolkit function appears in a snippet.
  text = "\n".join(BLOCKS)
  for name in ["support", "group_support", "sparse_params", "gamma", "find_state",
               "penalized_leaves", "sparsity_report",
               "format_report", "group_norms_tree", "coupling_residue", "entry_steps",
               "entered_by", "importance_ranks", "importance_scores", "prune_to_sparsity",
               "apply_masks", "masked_updates", "conv_input_channels", "dense_neurons",
               "attention_heads"]:
    assert f"sl.{name}(" in text, name
  assert "map_penalized(" in text
