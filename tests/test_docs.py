"""The Python snippets of each docs page run, in order, in one namespace, and use
the public functions that page documents; the relative links of the README and of the
reference pages resolve to a file and, with #, to one of its headings."""

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
    "transformers.md": (3, ["channel_groups", "splitlbi", "entry_steps", "support", "slim_linen",
                            "sparsity_report"]),
    "reference.md": (1, ["splitlbi", "by_ndim", "conv_filters", "support", "sparse_params",
                         "gamma", "find_state", "group_support", "penalized_leaves",
                         "sparsity_report", "format_report", "group_norms_tree",
                         "coupling_residue", "entry_steps", "entered_by", "importance_ranks",
                         "importance_scores", "prune_to_sparsity", "apply_masks",
                         "masked_updates"]),
}

ROOT = DOCS.parent
LINKED = ["README.md", "docs/reference.md", "docs/benchmarks.md", "docs/scaling.md",
          "docs/transformers.md", "docs/growing.md", "docs/results.md", "docs/slimming.md"]


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


def _without_code(text):
  return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def _anchors(path):
  """GitHub's heading ids: lowercase, punctuation dropped, spaces to '-', -1 on repeats."""
  seen, out = {}, set()
  for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _without_code(path.read_text(encoding="utf-8")),
                            flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return out


@pytest.mark.parametrize("page", LINKED)
def test_relative_links_resolve(page):
  path = ROOT / page
  links = re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text(encoding="utf-8")))
  assert links
  for link in links:
    if re.match(r"[a-z]+:", link):
      continue
    file, _, anchor = link.partition("#")
    target = (path.parent / file).resolve() if file else path
    assert target.exists(), f"{page}: {link}"
    if anchor and target.suffix == ".md":
      assert anchor in _anchors(target), f"{page}: {link}"
