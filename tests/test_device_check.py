"""tools/device_check.py (the GPU check: device tests + ``benchmarks.run --device``) in its
CPU smoke mode, so it cannot rot.

The smoke run goes through every section the device run has (tests in a fresh
process, update benchmark, train step with memory) on tiny trees; the byte
counts and the transformer tree are checked against hand-derived numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import common, measure, optimizers, shapes, suite
from tools import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_transformer_tree_by_hand():
  tree = shapes.transformer()
  # 24 blocks of 12·d² + 13·d, token + position embeddings, final LayerNorm (d = 2048).
  assert shapes.num_params(tree) == 24 * (12 * 2048**2 + 13 * 2048) + (32000 + 2048) * 2048 + 2 * 2048
  assert shapes.num_params(tree) == 1_278_332_928
  # Per block: 2 LayerNorms (2 leaves each), 4 attention dense (2 each), 2 MLP dense (2 each).
  assert len(shapes.jax.tree.leaves(tree)) == 2 + 24 * 16 + 2


# Transformer(1 block, d=4, MLP 4×, vocab 10, 3 positions): 2-D leaves (lasso) hold
# 40 + 12 + 4·16 + 2·64 = 244 params, 1-D leaves (no penalty) 8 + 16 + 8 + 16 + 4 + 8 = 60.
PEN, UNPEN = 244, 60
HAND_BYTES = {"sgd": 4 * (3 + 2) * (PEN + UNPEN),
              "adamw": 4 * (3 + 4) * (PEN + UNPEN),
              "splitlbi": 4 * (3 * (PEN + UNPEN) + 6 * PEN + 2 * UNPEN),
              "splitlbi_lean": 4 * (3 * (PEN + UNPEN) + 4 * PEN + 2 * UNPEN),
              "splitlbi_adam": 4 * (3 * (PEN + UNPEN) + 8 * PEN + 4 * UNPEN)}


@pytest.mark.parametrize("name", sorted(HAND_BYTES))
def test_update_bytes_by_hand(name):
  tree = shapes.transformer(1, 4, 4, 10, 3)
  assert shapes.num_params(tree) == PEN + UNPEN
  assert optimizers.bytes_moved(name, tree) == HAND_BYTES[name]


def test_update_one_optimizer_at_a_time():
  """The path the 1.3B tree takes on a GPU (too big for all optimizers at once)."""
  tree = shapes.transformer(1, 4, 4, 10, 3)
  timing = common.Timing(sample_s=1e-3, warmup=1)
  r = measure.update(tree, rounds=2, copy_bytes=2**16, timing=timing, opts=("sgd", "splitlbi"),
                     deadline=time.time() + 300, together=False)
  assert r["interleaved"].startswith("each optimizer")
  assert set(r["opts"]) == {"sgd", "splitlbi"} and not r["skipped"]
  for name, o in r["opts"].items():
    assert o["bytes"] == HAND_BYTES[name] and o["n"] == 2 and o["median"] > 0
  assert r["opts"]["sgd"]["ratio_vs_sgd"] == 1.0
  past = measure.update(tree, rounds=2, copy_bytes=2**16, timing=timing,
                        opts=("sgd", "splitlbi"), deadline=0.0, together=False)
  assert past["opts"] == {} and past["skipped"] == ["sgd", "splitlbi"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_ok2[x]" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="x">tb</failure></testcase>
<testcase classname="tests.test_b" name="test_err" time="0.1"><error message="y">tb</error></testcase>
<testcase classname="tests.test_b" name="test_skip" time="0.1"><skipped message="z"/></testcase>
</testsuite></testsuites>"""


def test_parse_junit_and_verbose_log(tmp_path):
  path = tmp_path / "j.xml"
  path.write_text(JUNIT)
  r = device_check.parse_junit(str(path))
  assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (2, 1, 1, 1)
  assert r["failures"] == ["test_a::test_bad", "test_b::test_err"]  # module basename
  assert device_check.parse_junit(str(tmp_path / "missing.xml")) is None
  log = ("tests/t.py::test_a PASSED [ 33%]\ntests/t.py::test_b[1-x] FAILED [ 66%]\n"
         "tests/t.py::test_c ERROR [100%]\nsomething PASSED\n"
         "[gw0] [ 50%] PASSED tests/u.py::test_d[a-b] \n[gw3] [100%] FAILED tests/u.py::test_e\n")
  r = device_check.parse_verbose_log(log)
  assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (2, 2, 1, 0)
  assert r["failures"] == ["tests/t.py::test_b[1-x]", "tests/t.py::test_c", "tests/u.py::test_e"]


def test_failing_test_is_reported_and_sets_exit_code(tmp_path, monkeypatch):
  test_file = tmp_path / "test_planted.py"
  test_file.write_text("def test_passes():\n  assert 1 + 1 == 2\n\n"
                       "def test_planted_failure():\n  assert 1 + 1 == 3\n")
  monkeypatch.setattr(device_check, "TEST_FILES", (str(test_file),))
  monkeypatch.setattr(device_check, "SMOKE_K", "planted or passes")
  out = tmp_path / "out"
  out.mkdir()
  r = device_check.run_tests(str(out), time.time() + 120, smoke=True)
  assert r["status"] == "ok"
  assert (r["passed"], r["failed"], r["errors"]) == (1, 1, 0)
  assert r["failures"] == ["test_planted::test_planted_failure"]
  assert device_check.exit_code(r) == 1
  assert device_check.exit_code({**r, "failed": 0}) == 0
  assert device_check.exit_code({"status": "timeout"}) == 2
  assert device_check.exit_code(None) == 2


def _run(out, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", "tools.device_check", "--smoke",
                         "--out", str(out), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def test_budget_guard_skips_every_section(tmp_path):
  p = _run(tmp_path, "--budget-s", "0", timeout=120)
  assert p.returncode == 2, p.stdout + p.stderr  # the tests did not run: not a pass
  res = json.loads((tmp_path / "results_gpu.json").read_text())
  assert set(res["sections"]) == {"tests", "update", "train DigitsCNN"}
  assert all(s["status"].startswith("skipped: budget") for s in res["sections"].values())
  assert "tests: skipped: budget" in (tmp_path / "RESULTS_GPU.md").read_text()


def test_smoke_run_end_to_end(tmp_path):
  p = _run(tmp_path)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "== device_check:" in p.stdout and "nothing skipped or failed" in p.stdout
  files = sorted(os.listdir(tmp_path))
  assert files == ["RESULTS_GPU.md", "junit_tests.xml", "log_main.txt", "log_tests.txt",
                   "log_train.txt", "log_update.txt", "results_gpu.json"]
  res = json.loads((tmp_path / "results_gpu.json").read_text())
  tests = res["sections"]["tests"]
  assert tests["status"] == "ok" and tests["backend"] == "cpu"
  assert tests["passed"] >= 3 and tests["failed"] == tests["errors"] == 0
  tree = res["sections"]["update"]["result"]["trees"]["Transformer-tiny"]
  d = 32  # smoke tree: transformer(1 block, d=32, MLP 4×, vocab 100, 16 positions)
  assert tree["params"] == (12 * d * d + 13 * d) + (100 + 16) * d + 2 * d
  assert set(tree["opts"]) == set(measure.UPDATE_OPTS)
  assert tree["opts"]["sgd"]["bytes"] == 5 * 4 * tree["params"]
  for o in tree["opts"].values():
    assert o["median"] > 0 and 0 < o["fraction_of_copy_bandwidth"]
  train = res["sections"]["train DigitsCNN"]["result"]
  assert set(train["opts"]) == set(train["memory"]) == set(suite.TRAIN_MODELS["smoke"]["DigitsCNN"].opts)
  assert list(train["memory"]) == ["sgd", "splitlbi"]  # increasing state
  comp = train["compile"]
  # Optimizer state: SGD 1×, SplitLBI 3× the penalized parameters (+ momentum elsewhere).
  assert comp["sgd"]["state_bytes"] < comp["splitlbi"]["state_bytes"] < 3 * comp["sgd"]["state_bytes"]
  assert train["opts"]["sgd"]["ratio_vs_sgd"] == 1.0
  md = (tmp_path / "RESULTS_GPU.md").read_text()
  for heading in ("## Device", "## Correctness tests", "## Update only", "## Train step"):
    assert heading in md
