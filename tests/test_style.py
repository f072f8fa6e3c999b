"""House rules of the package, checked on its source.

- No function longer than 60 lines of code (its docstring not counted), in the
  package and in ``examples/``, ``benchmarks/`` and ``tools/``.
- XLA:CPU workarounds only in ``_xla_cpu.py``: no other module reads
  ``os.environ`` / ``XLA_FLAGS`` or calls ``platform_dependent``.
- The public API is ``__all__``, every name in it documented.
"""

import ast
import pathlib

import pytest

import optax_splitlbi as sl

PACKAGE = pathlib.Path(sl.__file__).parent
ROOT = PACKAGE.parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
ALL_SOURCES = SOURCES + sorted(p for d in ("examples", "benchmarks", "tools") for p in (ROOT / d).rglob("*.py"))
MAX_LINES = 60


def _code_lines(fn: ast.FunctionDef) -> int:
  body = fn.body
  has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                         ast.Constant)
  if has_doc and len(body) == 1:
    return 0
  start = body[1].lineno if has_doc else body[0].lineno
  return fn.end_lineno - start + 1


@pytest.mark.parametrize("path", ALL_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short(path):
  tree = ast.parse(path.read_text(encoding="utf-8"))
  long = {node.name: _code_lines(node) for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and _code_lines(node) > MAX_LINES}
  assert not long, long


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "_xla_cpu.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_compiler_workarounds_live_in_one_module(path):
  text = path.read_text(encoding="utf-8")
  for needle in ("platform_dependent", "os.environ", "XLA_FLAGS"):
    assert needle not in text, (path.name, needle)


def test_public_api_is_documented():
  assert len(sl.__all__) == len(set(sl.__all__))
  for name in sl.__all__:
    obj = getattr(sl, name)
    assert obj.__doc__ and obj.__doc__.strip(), name
  # Internals stay in their modules.
  for internal in ("StaticHyperparams", "resolve_penalties", "path_str", "group_map",
                   "LeafPenalty", "prox", "hyperparams"):
    assert internal not in sl.__all__, internal
