"""The README's Python snippets run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
  assert BLOCKS


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
