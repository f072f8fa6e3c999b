"""The GPU check in one command: correctness tests, update and train-step speed, memory.

On a machine with a GPU (one H100 / H200: about 4-5 minutes)::

  PYTHONPATH=. python3 -m benchmarks.device_check --out $OUT

On CPU, in seconds (CI runs this, ``tests/test_device_check.py``)::

  python -m benchmarks.device_check --smoke --out /tmp/device_check

Sections, each in its own process (a crash, an out-of-memory or a time-out
is recorded and the next section runs; device memory peaks stay separate):

1. ``tests``: pytest on :data:`TEST_FILES` selected by :data:`TEST_K`, with
   ``JAX_DEFAULT_MATMUL_PRECISION=highest`` (no TF32 in f32 matmuls), on the
   default backend: the NumPy-reference tests of the transform for every option
   set, lean and bf16 modes, the prox tests (hypothesis examples capped at
   :data:`HYPOTHESIS_EXAMPLES`).
2. ``update``: donated, jitted update + ``apply_updates`` on the ResNet-50,
   VGG-16 and 1.3B-parameter transformer trees for SplitLBI (default, lean),
   SGD-momentum and AdamW, with the bytes each must move and the fraction of the
   device's copy bandwidth reached (``benchmarks.device_workers``).
3. ``train ResNet-18`` (batch 256, 224×224×3, 1000 classes), then ``train
   ResNet-20`` (batch 128, 32×32×3): full train step on synthetic data,
   SGD-momentum vs SplitLBI (and lean SplitLBI when time allows), interleaved;
   then peak device memory per optimizer (``memory_stats()``) in a second
   process that loads the compiled steps from a compilation cache.

A wall-clock budget (``--budget-s``) bounds the run: a section gets at most
its cap (:data:`CAPS`) and what is left of the budget; sections that cannot
start are recorded as skipped. Results: ``RESULTS_GPU.md``, ``results_gpu.json``,
the tests' JUnit XML and the logs, all in ``--out`` (7 small files).

Exit status: 0 if the correctness tests passed, 1 if any failed or errored,
2 if they did not run to the end (time-out, crash, nothing selected, skipped).
Benchmark failures never change it: they are in the results.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

# ---- Test selection: the single place to update when tests are renamed or moved. ----
TEST_FILES = ("tests/test_transform.py", "tests/test_memory_modes.py", "tests/test_prox.py")
# Device run: everything in TEST_FILES in the "equations" form of the update; the
# "buffered" and "fused" forms (xla_cpu_form) only differ when compiled for CPU.
TEST_K = "not fused and not buffered"
# CI smoke run: one NumPy-reference case and the prox hand values.
SMOKE_K = "(test_matches_numpy_reference and default and stored) or hand_values"
HYPOTHESIS_EXAMPLES = 20
TEST_WORKERS = 4  # pytest-xdist processes on the device (sharing the GPU; no preallocation)
# ---------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Section -> longest wall time (s) it may take on the device; the budget trims it.
CAPS = {"tests": 120, "update": 100, "train ResNet-18": 150, "train ResNet-20": 60}
SMOKE_CAPS = {"tests": 120, "update": 120, "train DigitsCNN": 120}
MIN_SECTION_S = 20.0  # a section is not started with less time left than this
GRACE_S = 25.0        # a worker may overrun its deadline by this before it is killed
MEMORY_RESERVE_S = 25.0  # of a train section, kept for its memory process
LOG_LIMIT = 15 * 2**20
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "flax", "optax", "chex", "numpy", "pytest", "hypothesis")


class Log:
  """Prints to stdout and appends to ``log_main.txt`` in the output folder."""

  def __init__(self, out: str):
    self.path = os.path.join(out, "log_main.txt")

  def __call__(self, msg: str) -> None:
    print(msg, flush=True)
    with open(self.path, "a") as f:
      f.write(msg + "\n")


def host_info() -> dict:
  """Python, package versions, GPU name / driver / CUDA from nvidia-smi (no JAX start)."""
  info = {"python": platform.python_version(), "hostname_platform": platform.platform(),
          "versions": {}}
  for name in VERSIONS:
    try:
      info["versions"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  info["nvidia_smi"] = _nvidia_smi()
  try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, timeout=10,
                                        capture_output=True, text=True).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    info["git_commit"] = None
  info["package_sha256"] = package_hash()
  return info


def package_hash() -> str:
  """sha256 of the package's source files: names the code run even where the copy's
  ``.git`` is stale (a device machine gets the working tree, not the commits)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  pkg = os.path.join(ROOT, "optax_splitlbi")
  for name in sorted(os.listdir(pkg)):
    if name.endswith(".py"):
      with open(os.path.join(pkg, name), "rb") as f:
        h.update(name.encode() + b"\0" + f.read())
  return h.hexdigest()[:16]


def _nvidia_smi() -> dict | None:
  try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  m = re.search(r"CUDA Version:\s*([\d.]+)", full)
  return {"gpus": [s.strip() for s in q.stdout.strip().splitlines()],
          "cuda_version": m.group(1) if m else None}


def _run_logged(cmd: list[str], log_path: str, timeout_s: float, env: dict | None = None) -> dict:
  """Runs ``cmd`` in ROOT, output appended to ``log_path``; kills its process group
  after ``timeout_s``. Returns rc (None if killed), wall seconds, timed_out."""
  t0 = time.time()
  with open(log_path, "a") as log:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
      rc, timed_out = proc.wait(timeout=max(timeout_s, 1.0)), False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      rc, timed_out = None, True
  return {"rc": rc, "wall_s": time.time() - t0, "timed_out": timed_out}


def _tail(path: str, chars: int = 2500, start: int = 0) -> str:
  """The last ``chars`` characters of ``path`` from byte ``start`` on ("" if unreadable)."""
  try:
    with open(path, "rb") as f:
      f.seek(start)
      return f.read().decode("utf-8", "replace")[-chars:]
  except OSError:
    return ""


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
          "-p", "benchmarks.device_pytest_plugin", "--continue-on-collection-errors"]
  return args + (["-n", str(workers)] if workers > 1 else [])


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
  run = _run_logged(cmd, log, deadline - time.time(), env)
  text = _tail(log, 10**8, start)
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


# ----------------------------------------------------------------------------- benchmarks


def run_worker(section: str, out: str, deadline: float, log_name: str, extra: list[str]) -> dict:
  """Runs ``benchmarks.device_workers`` in a fresh process; returns its JSON and status."""
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "res.json")
    cmd = [sys.executable, "-m", "benchmarks.device_workers", section, "--json", path,
           "--deadline", f"{deadline:.1f}", *extra]
    log = os.path.join(out, log_name)
    run = _run_logged(cmd, log, deadline - time.time() + GRACE_S)
    try:
      with open(path) as f:
        res = json.load(f)
    except (OSError, ValueError):
      res = {}
  res.update(run)
  res["status"] = ("timeout (killed; partial results kept)" if run["timed_out"]
                   else "ok" if run["rc"] == 0 else f"crashed (exit code {run['rc']})")
  if run["rc"] != 0:
    res["log_tail"] = _tail(log)
  return res


def run_train(key: str, out: str, deadline: float, smoke: bool) -> dict:
  """Train-step timing of one model, then its peak memory in a second process that
  loads the compiled steps from a shared compilation cache (no autotuning there)."""
  base = ["--model", key] + (["--smoke"] if smoke else [])
  with tempfile.TemporaryDirectory(prefix="device_check_cache_") as cache:
    base += ["--cache-dir", cache]
    res = run_worker("train", out, deadline - MEMORY_RESERVE_S, "log_train.txt", base)
    opts = list((res.get("result") or {}).get("compile", {}))
    if not opts:
      res["memory_run"] = {"status": "skipped: nothing compiled"}
      return res
    mem = run_worker("memory", out, deadline, "log_train.txt", base + ["--opts", ",".join(opts)])
  res["memory_run"] = {k: mem.get(k) for k in ("status", "rc", "wall_s", "timed_out", "error",
                                                "log_tail") if k in mem}
  res.setdefault("result", {})["memory"] = (mem.get("result") or {}).get("memory", {})
  res["result"]["memory_skipped"] = (mem.get("result") or {}).get("skipped", [])
  res["wall_s"] = res.get("wall_s", 0) + mem.get("wall_s", 0)
  return res


def plan(smoke: bool) -> list[tuple[str, float, object]]:
  """(section name, cap in s, runner(out, deadline)) in the order they run."""
  caps = SMOKE_CAPS if smoke else CAPS
  update_args = ["--smoke"] if smoke else []
  sections = [("tests", lambda out, dl: run_tests(out, dl, smoke)),
              ("update", lambda out, dl: run_worker("update", out, dl, "log_update.txt",
                                                     update_args))]
  from benchmarks import device_workers as dw  # pylint: disable=import-outside-toplevel
  for key in (dw.SMOKE_TRAIN_MODELS if smoke else dw.TRAIN_MODELS):
    sections.append((f"train {key}", lambda out, dl, key=key: run_train(key, out, dl, smoke)))
  return [(name, caps[name], fn) for name, fn in sections]


# ----------------------------------------------------------------------------- main


def exit_code(tests: dict | None) -> int:
  """0: tests passed; 1: some failed or errored; 2: they did not run to the end."""
  if not tests or tests.get("status") != "ok":
    return 2
  return 1 if tests["failed"] or tests["errors"] else 0


def _cap_files(out: str) -> None:
  """Keeps every file in ``out`` under the 16 MiB a device run can return (log tails)."""
  for name in os.listdir(out):
    path = os.path.join(out, name)
    if os.path.isfile(path) and os.path.getsize(path) > LOG_LIMIT:
      with open(path, "rb") as f:
        f.seek(-LOG_LIMIT, os.SEEK_END)
        data = f.read()
      with open(path, "wb") as f:
        f.write(b"[... truncated ...]\n" + data)


def run_sections(res: dict, out: str, deadline: float, smoke: bool, log: Log) -> None:
  """Runs every section of :func:`plan` within its cap and the budget; records all."""
  json_path = os.path.join(out, "results_gpu.json")
  for name, cap, runner in plan(smoke):
    left = deadline - time.time()
    if left < (1.0 if smoke else MIN_SECTION_S):
      res["sections"][name] = {"status": f"skipped: budget ({max(left, 0):.0f} s left)"}
      log(f"[device_check] {name}: skipped, {max(left, 0):.0f} s of the budget left")
      continue
    log(f"[device_check] {name}: start (up to {min(cap, left):.0f} s)")
    try:
      res["sections"][name] = runner(out, time.time() + min(cap, left))
    except Exception as e:  # pylint: disable=broad-except
      res["sections"][name] = {"status": f"error in the driver: {e!r}"}
    sec = res["sections"][name]
    log(f"[device_check] {name}: {sec.get('status')} in {sec.get('wall_s', 0):.0f} s")
    with open(json_path, "w") as f:
      json.dump(res, f, indent=1, default=str)


def main(argv=None) -> int:
  from benchmarks import device_report  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="folder for RESULTS_GPU.md, JSON and logs")
  ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny, seconds")
  ap.add_argument("--budget-s", type=float, default=300.0,
                  help="wall-clock budget; sections that cannot start in it are skipped")
  a = ap.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  log, t0 = Log(a.out), time.time()
  res = {"command": shlex.join(["python", "-m", "benchmarks.device_check",
                                *(sys.argv[1:] if argv is None else argv)]),
         "smoke": a.smoke, "budget_s": a.budget_s,
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "host": host_info(), "sections": {}}
  run_sections(res, a.out, t0 + a.budget_s, a.smoke, log)
  res["total_s"] = time.time() - t0
  res["exit_code"] = exit_code(res["sections"].get("tests"))
  with open(os.path.join(a.out, "results_gpu.json"), "w") as f:
    json.dump(res, f, indent=1, default=str)
  with open(os.path.join(a.out, "RESULTS_GPU.md"), "w") as f:
    f.write(_safely(device_report.render, res))
  _cap_files(a.out)
  log(_safely(device_report.summary, res))
  return res["exit_code"]


def _safely(render, res: dict) -> str:
  """``render(res)``, or the error and the raw JSON if rendering fails (never lose a run)."""
  try:
    return render(res)
  except Exception:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    return (f"Rendering failed:\n```\n{traceback.format_exc()}```\n\n```json\n"
            f"{json.dumps(res, indent=1, default=str)[:200000]}\n```\n")


if __name__ == "__main__":
  sys.exit(main())
