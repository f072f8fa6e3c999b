"""The benchmark driver: runs the sections of :mod:`benchmarks.suite` and writes the report.

CPU (``results/RESULTS.md`` and ``results/results.json``; 5 min on 2 idle
cores, 15 min when they are loaded; ``--quick`` under 2 min, written as
``RESULTS_quick.md``)::

  python -m benchmarks.run [--quick] [--only update train ...]

An accelerator (one H100 / H200: about 3 minutes; ``--smoke``: the same sections
on tiny shapes, in seconds on a CPU)::

  python -m benchmarks.run --device --out DIR [--budget-s 300]

The correctness tests and these sections in one command, on a device:
``python -m tools.device_check`` (it calls :func:`run_sections`).

A wall-clock budget (``--budget-s``) bounds a run: a section that cannot start
in what is left is recorded as skipped. Device sections run each in a fresh
process (a crash, an out-of-memory or a time-out is recorded and the next
section runs; device memory peaks stay separate), killed after their cap
(:data:`DEVICE_CAPS`) or the budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

from benchmarks import common, report, suite

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
NOTES = os.path.join(HERE, "notes.md")
CPU_SECTIONS = ("update", "train", "memory", "scaling", "fused", "cross_leaf", "slim")
# Device section -> longest wall time (s) it may take; the budget trims it.
DEVICE_CAPS = {"update": 100, "train ResNet-18": 150, "train ResNet-20": 60}
SMOKE_CAPS = {"update": 120, "train DigitsCNN": 120}
MIN_SECTION_S = 20.0  # a device section is not started with less time left than this
GRACE_S = 25.0        # a worker may overrun its deadline by this before it is killed
MEMORY_RESERVE_S = 25.0  # of a train section, kept for its memory process
LOG_LIMIT = 15 * 2**20
# XLA:CPU's multi-output fusion pass (off by default; process-wide, set before JAX starts).
MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


class Section(NamedTuple):
  """One unit of a run: ``run(deadline)`` returns its record (``status``, ``result``...)."""

  name: str
  cap_s: float | None
  run: Callable[[float], dict]


class Log:
  """Prints, and appends to ``log_main.txt`` in ``out`` when there is one."""

  def __init__(self, out: str | None):
    self.path = os.path.join(out, "log_main.txt") if out else None

  def __call__(self, msg: str) -> None:
    print(msg, flush=True)
    if self.path:
      with open(self.path, "a") as f:
        f.write(msg + "\n")


# ----------------------------------------------------------------------------- processes


def tail(path: str, chars: int = 2500, start: int = 0) -> str:
  """The last ``chars`` characters of ``path`` from byte ``start`` on ("" if unreadable)."""
  try:
    with open(path, "rb") as f:
      f.seek(start)
      return f.read().decode("utf-8", "replace")[-chars:]
  except OSError:
    return ""


def run_logged(cmd: list[str], log_path: str | None, timeout_s: float,
               env: dict | None = None) -> dict:
  """Runs ``cmd`` in the repository root, output appended to ``log_path`` (else the
  console); kills its process group after ``timeout_s``. Returns rc (None if
  killed), wall seconds, timed_out."""
  t0 = time.time()
  log = open(log_path, "a") if log_path else None  # pylint: disable=consider-using-with
  try:
    if log:
      log.write(f"\n$ {shlex.join(cmd)}\n")
      log.flush()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT if log
                            else None, env=env, start_new_session=True)
    try:
      rc, timed_out = proc.wait(timeout=max(timeout_s, 1.0)), False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      rc, timed_out = None, True
  finally:
    if log:
      log.close()
  return {"rc": rc, "wall_s": time.time() - t0, "timed_out": timed_out}


def in_fresh_process(worker: list[str], deadline: float, log_path: str | None = None,
                     xla_flag: str | None = None) -> dict:
  """``python -m benchmarks.run --worker ...`` in a fresh process (with ``xla_flag``
  added to ``XLA_FLAGS``); its record, partial results kept if it was killed."""
  env = dict(os.environ)
  if xla_flag:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flag).strip()
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "res.json")
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", *worker, "--json", path,
           "--deadline", f"{min(deadline, 4e9):.1f}"]
    run = run_logged(cmd, log_path, deadline - time.time() + GRACE_S, env)
    try:
      with open(path) as f:
        rec = json.load(f)
    except (OSError, ValueError):
      rec = {}
  rec.update(run)
  rec["status"] = ("timeout (killed; partial results kept)" if run["timed_out"]
                   else "ok" if run["rc"] == 0 else f"crashed (exit code {run['rc']})")
  if run["rc"] != 0 and log_path:
    rec["log_tail"] = tail(log_path)
  return rec


# ----------------------------------------------------------------------------- sections


def in_process(fn: Callable[[], dict]) -> Callable[[float], dict]:
  """A section run in this process: its record, or the error if it raised."""

  def run(deadline: float) -> dict:  # pylint: disable=unused-argument
    t0 = time.time()
    try:
      return {"status": "ok", "result": fn(), "wall_s": time.time() - t0}
    except Exception as e:  # pylint: disable=broad-except
      return {"status": f"error: {e!r}", "error": traceback.format_exc()[-3000:],
              "wall_s": time.time() - t0}

  return run


def _fused(mode: str) -> dict:
  """The update and train sections again in fresh processes with :data:`MOF_FLAG`."""
  recs = {s: in_fresh_process([s, "--mode", mode], 4e9, xla_flag=MOF_FLAG)
          for s in ("update", "train")}
  for s, rec in recs.items():
    if rec["status"] != "ok":
      raise RuntimeError(f"fused {s}: {rec['status']}")
  return {"flag": MOF_FLAG, **{s: rec["result"] for s, rec in recs.items()}}


def _cross_leaf(quick: bool) -> dict:
  from benchmarks import cross_leaf  # pylint: disable=import-outside-toplevel
  fused = in_fresh_process(["cross_leaf", "--mode", "quick" if quick else "full"], 4e9,
                           xla_flag=MOF_FLAG)
  return {"default": cross_leaf.run(quick), "fused": fused.get("result")}


def cpu_plan(quick: bool, only: tuple[str, ...] = CPU_SECTIONS) -> list[Section]:
  """The CPU sections, each in this process (``fused`` in fresh ones with the flag)."""
  from benchmarks import memory, scaling, slim  # pylint: disable=import-outside-toplevel
  mode = "quick" if quick else "full"
  runners = {"update": lambda: suite.update(mode), "train": lambda: suite.train_all(mode),
             "memory": lambda: memory.run(quick), "scaling": lambda: scaling.run(quick),
             "fused": lambda: _fused(mode), "cross_leaf": lambda: _cross_leaf(quick),
             "slim": lambda: slim.run(quick)}  # slim searches only if its masks are missing
  return [Section(name, None, in_process(runners[name])) for name in CPU_SECTIONS
          if name in only]


def device_train(mode: str, key: str, out: str, deadline: float) -> dict:
  """Train-step timing of one model, then its peak memory in a second process that
  loads the compiled steps from a shared compilation cache (no autotuning there)."""
  log = os.path.join(out, "log_train.txt")
  with tempfile.TemporaryDirectory(prefix="benchmarks_cache_") as cache:
    base = ["--mode", mode, "--model", key, "--cache-dir", cache]
    rec = in_fresh_process(["train", *base], deadline - MEMORY_RESERVE_S, log)
    opts = list((rec.get("result") or {}).get("compile", {}))
    if not opts:
      rec["memory_run"] = {"status": "skipped: nothing compiled"}
      return rec
    mem = in_fresh_process(["memory", *base, "--opts", ",".join(opts)], deadline, log)
  rec["memory_run"] = {k: mem[k] for k in ("status", "rc", "wall_s", "timed_out", "error",
                                           "log_tail") if k in mem}
  mem_result = mem.get("result") or {}
  rec.setdefault("result", {})["memory"] = mem_result.get("memory", {})
  rec["result"]["memory_skipped"] = mem_result.get("skipped", [])
  rec["wall_s"] = rec.get("wall_s", 0) + mem.get("wall_s", 0)
  return rec


def device_plan(smoke: bool, out: str) -> list[Section]:
  """The accelerator sections, each in a fresh process: update, then one per model."""
  mode, caps = ("smoke", SMOKE_CAPS) if smoke else ("device", DEVICE_CAPS)
  log = os.path.join(out, "log_update.txt")
  plan = [Section("update", caps["update"],
                  lambda dl: in_fresh_process(["update", "--mode", mode], dl, log))]
  for key in suite.TRAIN_MODELS[mode]:
    plan.append(Section(f"train {key}", caps[f"train {key}"],
                        lambda dl, key=key: device_train(mode, key, out, dl)))
  return plan


def run_sections(res: dict, plan: list[Section], deadline: float, log: Log,
                 json_path: str, min_section_s: float = 1.0) -> None:
  """Runs every section of ``plan`` within its cap and the budget; records each in
  ``res["sections"]`` and rewrites ``json_path`` after each."""
  for name, cap, runner in plan:
    left = deadline - time.time()
    if left < min_section_s:
      res["sections"][name] = {"status": f"skipped: budget ({max(left, 0):.0f} s left)"}
      log(f"[benchmarks] {name}: skipped, {max(left, 0):.0f} s of the budget left")
      continue
    limit = left if cap is None else min(cap, left)
    log(f"[benchmarks] {name}: start" + (f" (up to {limit:.0f} s)" if limit < 1e9 else ""))
    try:
      res["sections"][name] = runner(time.time() + limit)
    except Exception as e:  # pylint: disable=broad-except
      res["sections"][name] = {"status": f"error in the driver: {e!r}"}
    sec = res["sections"][name]
    log(f"[benchmarks] {name}: {sec.get('status')} in {sec.get('wall_s', 0):.0f} s")
    with open(json_path, "w") as f:
      json.dump(res, f, indent=1, default=float)


# ----------------------------------------------------------------------------- worker


def enable_compilation_cache(cache_dir: str) -> None:
  """Persistent compilation cache shared by a train section's timing and memory processes.

  The memory process loads the train steps the timing process compiled, so no
  autotuning (whose scratch buffers come from the device allocator and would
  count in ``peak_bytes_in_use``) happens there.
  """
  import jax  # pylint: disable=import-outside-toplevel
  for name, value in (("jax_compilation_cache_dir", cache_dir),
                      ("jax_persistent_cache_min_compile_time_secs", 0.0),
                      ("jax_persistent_cache_min_entry_size_bytes", -1)):
    try:
      jax.config.update(name, value)
    except Exception as e:  # pylint: disable=broad-except  (then "load s" shows the miss)
      print(f"[cache] could not set {name}: {e!r}", flush=True)


def worker(a: argparse.Namespace) -> None:
  """One section in this (fresh) process; its record is rewritten to ``a.json`` as it goes."""
  if a.cache_dir:
    enable_compilation_cache(a.cache_dir)
  rec = {"info": common.machine_info()}

  def write(result: dict | None = None) -> None:
    if result is not None:
      rec["result"] = result
    tmp = a.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(rec, f, default=str)
    os.replace(tmp, a.json)

  write()
  print(f"[{a.worker}] backend {rec['info']['platform']}, devices {rec['info']['devices']}",
        flush=True)
  try:
    if a.worker == "update":
      write(suite.update(a.mode, a.deadline, write))
    elif a.worker == "train":
      write(suite.train(a.mode, a.model, a.deadline) if a.model
            else suite.train_all(a.mode, a.deadline))
    elif a.worker == "memory":
      write(suite.train_memory(a.mode, a.model, a.opts.split(","), a.deadline))
    else:
      from benchmarks import cross_leaf  # pylint: disable=import-outside-toplevel
      write(cross_leaf.run(a.mode == "quick"))
  except Exception:  # pylint: disable=broad-except
    rec["error"] = traceback.format_exc()[-3000:]
    print(f"[{a.worker}] failed:\n{rec['error']}", flush=True)
    write()


# ----------------------------------------------------------------------------- main


def new_results(mode: str, budget_s: float, command: list[str]) -> dict:
  """The head of a results JSON: command, mode, budget, date, host; no sections yet."""
  return {"command": shlex.join(command), "mode": mode,
          "budget_s": budget_s,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "host": common.host_info(), "sections": {}}


def cap_files(out: str) -> None:
  """Keeps every file in ``out`` under the 16 MiB a device run can return (log tails)."""
  for name in os.listdir(out):
    path = os.path.join(out, name)
    if os.path.isfile(path) and os.path.getsize(path) > LOG_LIMIT:
      with open(path, "rb") as f:
        f.seek(-LOG_LIMIT, os.SEEK_END)
        data = f.read()
      with open(path, "wb") as f:
        f.write(b"[... truncated ...]\n" + data)


def output_paths(a: argparse.Namespace) -> tuple[str, str]:
  """(markdown, JSON) paths of a run: ``RESULTS_GPU.md`` on a device, else
  ``RESULTS[_quick].md``, in ``--out`` (default ``benchmarks/results``)."""
  out = a.out or RESULTS
  os.makedirs(out, exist_ok=True)
  stem = "_GPU" if a.device else "_quick" if a.quick else ""
  return os.path.join(out, f"RESULTS{stem}.md"), os.path.join(out, f"results{stem.lower()}.json")


def finish(res: dict, md_path: str, json_path: str, head: list[str] | None = None) -> None:
  """Writes the JSON and the markdown (``head`` after its machine section) of a run."""
  with open(json_path, "w") as f:
    json.dump(res, f, indent=1, default=float)
  with open(md_path, "w") as f:
    f.write(report.safely(lambda r: report.render(r, head or ()), res))


def parse_args(argv: list[str]) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="CPU: fewer rounds, smaller trees")
  ap.add_argument("--device", action="store_true", help="the accelerator sections")
  ap.add_argument("--smoke", action="store_true", help="with --device: tiny, seconds on CPU")
  ap.add_argument("--only", nargs="*", choices=CPU_SECTIONS, default=CPU_SECTIONS,
                  help="CPU: run only these sections")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="wall-clock budget (device default 300 s; CPU none)")
  ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
  ap.add_argument("--notes", default=NOTES, help="CPU: a markdown file appended as 'Notes'")
  ap.add_argument("--render", metavar="JSON", help="only re-render the markdown of a JSON")
  ap.add_argument("--worker", choices=("update", "train", "memory", "cross_leaf"),
                  help=argparse.SUPPRESS)
  for flag in ("--mode", "--model", "--opts", "--cache-dir", "--json"):
    ap.add_argument(flag, help=argparse.SUPPRESS)
  ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def rerender(json_path: str) -> None:
  """Writes the markdown of a results JSON beside it (``results.json`` -> ``RESULTS.md``)."""
  with open(json_path) as f:
    res = json.load(f)
  md_path = os.path.join(os.path.dirname(json_path), report.markdown_name(json_path))
  with open(md_path, "w") as f:
    f.write(report.render(res))
  print(f"wrote {md_path}")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  if a.worker:
    worker(a)
    return 0
  if a.render:
    rerender(a.render)
    return 0
  if a.device and not a.out:
    raise SystemExit("--device needs --out DIR (its logs go there)")
  mode = ("smoke" if a.smoke else "device") if a.device else "quick" if a.quick else "full"
  budget = a.budget_s if a.budget_s is not None else 300.0 if a.device else float("inf")
  md_path, json_path = output_paths(a)
  res = new_results(mode, budget, ["python", "-m", "benchmarks.run", *argv])
  t0, log = time.time(), Log(a.out if a.device else None)
  if a.device:
    plan, min_section_s = device_plan(a.smoke, a.out), 1.0 if a.smoke else MIN_SECTION_S
  else:
    res["machine"] = common.machine_info()
    plan, min_section_s = cpu_plan(a.quick, tuple(a.only)), 1.0
  run_sections(res, plan, t0 + budget, log, json_path, min_section_s)
  if a.notes and not a.device:
    with open(a.notes) as f:
      res["notes"] = f.read()
  res["total_s"], res["loadavg_end"] = time.time() - t0, os.getloadavg()
  finish(res, md_path, json_path)
  if a.device:
    cap_files(a.out)
    log(report.safely(report.summary, res))
  print(f"wrote {md_path} and {json_path} in {res['total_s']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
