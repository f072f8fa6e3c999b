"""The GPU check in one command: the correctness tests on the device, then the benchmarks.

On a machine with a GPU (one H100 / H200: about 4-5 minutes)::

  PYTHONPATH=. python3 -m tools.device_check --out $OUT

On CPU, in seconds (CI runs this, ``tests/test_device_check.py``)::

  python -m tools.device_check --smoke --out /tmp/device_check

1. ``tests``: pytest on :data:`TEST_FILES` selected by :data:`TEST_K`, in a fresh
   process, with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` (no TF32 in f32
   matmuls), on the default backend: the NumPy-reference tests of the transform
   for every option set, lean and bf16 modes, the prox tests (hypothesis
   examples capped at :data:`HYPOTHESIS_EXAMPLES`; ``tools/device_pytest_plugin.py``).
2. The accelerator sections of the benchmarks (``python -m benchmarks.run
   --device``): update on the ResNet-50, VGG-16 and 1.3B-parameter transformer
   trees, train steps of ResNet-18 and ResNet-20 with peak device memory.

One wall-clock budget (``--budget-s``) bounds the run: the tests get at most
:data:`TESTS_CAP_S`, every section at most its cap and what is left; sections
that cannot start are recorded as skipped. Results: ``RESULTS_GPU.md``,
``results_gpu.json``, the tests' JUnit XML and the logs, all in ``--out`` (7
small files).

Exit status: 0 if the correctness tests passed, 1 if any failed or errored,
2 if they did not run to the end (time-out, crash, nothing selected, skipped).
Benchmark failures never change it: they are in the results.

It lives outside ``benchmarks/`` because it is not a benchmark: it runs the
test suite where the tests cannot otherwise run (a device machine) and
reports it next to the benchmark figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

from benchmarks import report
from benchmarks import run as bench

# ---- Test selection: the single place to update when tests are renamed or moved. ----
TEST_FILES = ("tests/test_transform.py", "tests/test_memory_modes.py", "tests/test_prox.py")
# Device run: everything in TEST_FILES in the "equations" form of the update; the
# "buffered" and "fused" forms (xla_cpu_form) only differ when compiled for CPU.
TEST_K = "not fused and not buffered"
# CI smoke run: one NumPy-reference case and the prox hand values.
SMOKE_K = "(test_matches_numpy_reference and default and stored) or hand_values"
HYPOTHESIS_EXAMPLES = 20
TEST_WORKERS = 4  # pytest-xdist processes on the device (sharing the GPU; no preallocation)
TESTS_CAP_S = 120.0
PLUGIN = "tools.device_pytest_plugin"
# ---------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------- tests


def parse_junit(path: str) -> dict | None:
  """Counts (passed / failed / errors / skipped) and failing test names from JUnit XML."""
  try:
    root = ET.parse(path).getroot()
  except (OSError, ET.ParseError):
    return None
  counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
  failures = []
  for case in root.iter("testcase"):
    # The module's own name: pytest prefixes the path from its rootdir, which depends on
    # where the repository and the test files are (e.g. a clone under /tmp).
    module = case.get("classname", "").rsplit(".", 1)[-1]
    name = f"{module}::{case.get('name', '')}"
    tags = {child.tag for child in case}
    if "failure" in tags:
      counts["failed"] += 1
      failures.append(name)
    elif "error" in tags:
      counts["errors"] += 1
      failures.append(name)
    elif "skipped" in tags:
      counts["skipped"] += 1
    else:
      counts["passed"] += 1
  return {**counts, "failures": failures}


_SERIAL_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)")
_XDIST_LINE = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED) (\S+::\S+)")
_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}


def parse_verbose_log(text: str) -> dict:
  """Fallback for a run cut short (no JUnit file): counts pytest's ``-v`` lines
  (``path::name OUTCOME`` serially, ``[gwN] [ P%] OUTCOME path::name`` with xdist)."""
  counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
  failures = []
  for line in text.splitlines():
    m = _SERIAL_LINE.match(line)
    name, outcome = (m.group(1), m.group(2)) if m else (None, None)
    m = None if m else _XDIST_LINE.match(line)
    if m:
      name, outcome = m.group(2), m.group(1)
    if name is None:
      continue
    counts[_OUTCOME[outcome]] += 1
    if outcome in ("FAILED", "ERROR"):
      failures.append(name)
  return {**counts, "failures": failures}


def _pytest_args(k: str, junit: str, workers: int) -> list[str]:
  args = [*TEST_FILES, "-k", k, "-vv", "-p", "no:cacheprovider", f"--junitxml={junit}",
          "-p", PLUGIN, "--continue-on-collection-errors"]
  if workers > 1:
    return args + ["-n", str(workers)]
  # one process, also where the project's addopts ask xdist for a worker per core
  return args + (["-n", "0"] if importlib.util.find_spec("xdist") else [])


def _pytest_run(args: list[str], log: str, deadline: float) -> dict:
  """One pytest process; its counts from the JUnit file (or the log if it was cut short)."""
  junit = next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml="))
  if os.path.exists(junit):
    os.remove(junit)
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", HYPOTHESIS_PROFILE="device",
             DEVICE_CHECK_HYPOTHESIS_EXAMPLES=str(HYPOTHESIS_EXAMPLES),
             XLA_PYTHON_CLIENT_PREALLOCATE="false")  # several test processes share the GPU
  env.setdefault("JAX_PLATFORMS", "")  # tests/conftest.py would otherwise pin the CPU
  cmd = [sys.executable, "-m", "pytest", *args]
  start = os.path.getsize(log) if os.path.exists(log) else 0
  run = bench.run_logged(cmd, log, deadline - time.time(), env)
  text = bench.tail(log, 10**8, start)
  counts = (None if run["timed_out"] else parse_junit(junit)) or parse_verbose_log(text)
  backend = re.search(r"^DEVICE_CHECK_BACKEND (\S+) (.*)$", text, re.M)
  m = re.search(r"(\d+) deselected", text)
  complete = run["rc"] in (0, 1) and counts["passed"] + counts["failed"] + counts["errors"] > 0
  return {**run, **counts, "deselected": int(m.group(1)) if m else 0,
          "backend": backend.group(1) if backend else None,
          "device_kind": backend.group(2).strip() if backend else None,
          "status": ("timeout" if run["timed_out"] else "ok" if complete
                     else f"pytest exit code {run['rc']}"), "text": text}


def run_tests(out: str, deadline: float, smoke: bool) -> dict:
  """The correctness tests in fresh processes on the default backend: with
  :data:`TEST_WORKERS` pytest-xdist workers where installed, else (or if that run
  broke down) in one process."""
  junit, log = os.path.join(out, "junit_tests.xml"), os.path.join(out, "log_tests.txt")
  k = SMOKE_K if smoke else TEST_K
  workers = TEST_WORKERS if not smoke and importlib.util.find_spec("xdist") else 1
  res = _pytest_run(_pytest_args(k, junit, workers), log, deadline)
  if workers > 1 and res["status"] not in ("ok", "timeout") and deadline - time.time() > 30:
    res = {**_pytest_run(_pytest_args(k, junit, 1), log, deadline),
           "first_try": f"{workers} workers: {res['status']}"}
    workers = 1
  text = res.pop("text")
  if res["status"] != "ok":
    res["log_tail"] = text[-2500:]
  res.update(selection={"files": list(TEST_FILES), "k": k}, workers=workers,
             env={"JAX_DEFAULT_MATMUL_PRECISION": "highest",
                  "hypothesis max_examples": HYPOTHESIS_EXAMPLES})
  return res


def exit_code(tests: dict | None) -> int:
  """0: tests passed; 1: some failed or errored; 2: they did not run to the end."""
  if not tests or tests.get("status") != "ok":
    return 2
  return 1 if tests["failed"] or tests["errors"] else 0


# ----------------------------------------------------------------------------- report


def tests_markdown(t: dict | None) -> list[str]:
  """The tests' part of RESULTS_GPU.md."""
  L = ["## Correctness tests on the device\n"]
  if not t or "passed" not in t:
    return L + [f"Not run: {(t or {}).get('status', 'no result')}.\n"]
  sel = t.get("selection", {})
  L.append(f"`pytest {' '.join(sel.get('files', []))} -k {sel.get('k')!r}` with "
           "`JAX_DEFAULT_MATMUL_PRECISION=highest`, hypothesis examples capped at "
           f"{t.get('env', {}).get('hypothesis max_examples')}; backend `{t.get('backend')}` "
           f"({t.get('device_kind')}). Status **{t['status']}** in {t.get('wall_s', 0):.0f} s: "
           f"**{t['passed']} passed, {t['failed']} failed, {t['errors']} errors**, "
           f"{t['skipped']} skipped, {t.get('deselected', 0)} deselected.\n")
  if t.get("failures"):
    L += ["Failures:\n", *(f"- `{n}`" for n in t["failures"]), ""]
  return L


def tests_summary(t: dict, smoke: bool) -> list[str]:
  """The tests' lines of the closing summary."""
  L = [f"tests: {t.get('status', 'not run')}: {t.get('passed', 0)} passed, "
       f"{t.get('failed', 0)} failed, {t.get('errors', 0)} errors, backend {t.get('backend')}, "
       f"{t.get('wall_s', 0):.0f} s"]
  L.extend(f"  FAILED {n}" for n in t.get("failures", [])[:30])
  if not smoke and t.get("backend") not in (None, "gpu", "tpu"):
    L.append(f"  WARNING: the tests ran on backend {t.get('backend')}, not on an accelerator")
  return L


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="folder for RESULTS_GPU.md, JSON and logs")
  ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny, seconds")
  ap.add_argument("--budget-s", type=float, default=300.0,
                  help="wall-clock budget; sections that cannot start in it are skipped")
  a = ap.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  log, t0 = bench.Log(a.out), time.time()
  res = bench.new_results("smoke" if a.smoke else "device", a.budget_s,
                          ["python", "-m", "tools.device_check", *argv])
  tests = bench.Section("tests", TESTS_CAP_S, lambda dl: run_tests(a.out, dl, a.smoke))
  json_path = os.path.join(a.out, "results_gpu.json")
  bench.run_sections(res, [tests, *bench.device_plan(a.smoke, a.out)], t0 + a.budget_s, log,
                     json_path, 1.0 if a.smoke else bench.MIN_SECTION_S)
  t = res["sections"]["tests"]
  res["total_s"], res["exit_code"] = time.time() - t0, exit_code(t)
  bench.finish(res, os.path.join(a.out, "RESULTS_GPU.md"), json_path, tests_markdown(t))
  bench.cap_files(a.out)
  log(report.safely(lambda r: report.summary(r, tests_summary(t, a.smoke), "device_check"), res))
  return res["exit_code"]


if __name__ == "__main__":
  sys.exit(main())
