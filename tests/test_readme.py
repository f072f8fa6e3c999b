"""The README's Python snippets run as written, and its two commands are the ones CI runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)

INSTALL_AND_RUN = 'pip install -e ".[examples]" && python -m examples.train'
INSTALL_AND_TEST = 'pip install -e ".[test]" && python -m pytest'


def test_readme_has_snippets():
  # Two snippets: a train step (optax.chain(splitlbi(...))) and slimming. The toolkit
  # snippet lives in docs/reference.md, the multi-device one in docs/scaling.md; both
  # run in tests/test_docs.py and tests/test_multi_device_example.py.
  assert len(BLOCKS) == 2
  assert "optax.chain(" in BLOCKS[0] and "sl.splitlbi(" in BLOCKS[0]
  assert "sl.slim_linen(" in BLOCKS[1]


def test_two_commands():
  section = TEXT.split("## Two commands", 1)[1].split("\n## ", 1)[0]
  bash = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
  assert bash == [INSTALL_AND_RUN, INSTALL_AND_TEST]
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  assert INSTALL_AND_TEST in ci.splitlines()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index):
  namespace = {}
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
  if "sparse" in namespace:  # the train-step snippet: masks match the params
    import jax
    params, masks = namespace["params"], namespace["masks"]
    assert masks["Conv_0"]["kernel"].shape == params["Conv_0"]["kernel"].shape
    assert masks["Conv_0"]["bias"] is None
    assert jax.tree.structure(namespace["sparse"]) == jax.tree.structure(params)
  if "res" in namespace:  # the slimming snippet: five of eight filters are left
    assert namespace["res"].module.width == 5
