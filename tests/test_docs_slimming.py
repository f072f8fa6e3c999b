"""The Python snippets of docs/slimming.md run, in order, in one namespace."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "slimming.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_slimming_doc_snippets_run_in_order():
  assert len(BLOCKS) >= 4
  namespace = {}
  for i, block in enumerate(BLOCKS):
    exec(compile(block, f"docs/slimming.md[python block {i}]", "exec"), namespace)
  text = "\n".join(BLOCKS)
  for name in ("slim", "slim_linen", "slim_nnx", "format_slim_report", "coupled_channels"):
    assert f"sl.{name}(" in text, name
