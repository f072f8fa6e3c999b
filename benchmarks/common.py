"""Timing, bandwidth and machine helpers shared by the benchmarks.

Timings are taken round-robin ("interleaved"): every round runs each candidate
once, in a shuffled order, so machine-wide slowdowns (other processes, VM
stalls) hit all candidates alike; we report medians, interquartile ranges and
ratios of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


class Stepper:
  """Runs a jitted step that consumes (donates) and returns its own state.

  ``fn(*state, *const) -> new_state`` (a tuple of the same structure as
  ``state``). :meth:`run` times one call until its outputs are ready.
  """

  def __init__(self, fn: Callable, state: tuple, const: tuple = ()):
    self.fn, self.state, self.const = fn, tuple(state), tuple(const)

  def run(self) -> float:
    t0 = time.perf_counter()
    out = self.fn(*self.state, *self.const)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    self.state = tuple(out)
    return dt


def interleaved(steppers: dict[str, Stepper], rounds: int, warmup: int = 2,
                seed: int = 0) -> dict[str, list[float]]:
  """Times ``rounds`` calls of every stepper, round-robin in shuffled order."""
  rng = random.Random(seed)
  names = list(steppers)
  for _ in range(warmup):
    for n in names:
      steppers[n].run()
  times = {n: [] for n in names}
  for _ in range(rounds):
    rng.shuffle(names)
    for n in names:
      times[n].append(steppers[n].run())
  return times


def stats(xs: list[float]) -> dict:
  """Median, quartiles, IQR, min and count of a list of timings (seconds)."""
  a = np.asarray(xs, np.float64)
  q1, med, q3 = np.percentile(a, [25, 50, 75])
  return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
          "min": float(a.min()), "n": int(a.size), "raw": [float(x) for x in a]}


def copy_stepper(nbytes: int) -> tuple[Stepper, int]:
  """A donated, jitted ``x + 1`` over an f32 array of ``nbytes``.

  Returns the stepper and the bytes it moves per call (read + write).
  """
  n = nbytes // 4
  x = jnp.zeros((n,), jnp.float32)
  f = jax.jit(lambda x: (x + 1,), donate_argnums=0)
  return Stepper(f, (x,)), 2 * n * 4


def machine_info() -> dict:
  """CPU model, cores, memory, versions and JAX devices."""
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem = None
  try:
    with open("/proc/meminfo") as f:
      mem = int(f.readline().split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  import flax
  import jaxlib
  import optax
  return {
      "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": jaxlib.__version__, "optax": optax.__version__, "flax": flax.__version__,
      "numpy": np.__version__, "platform": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
  }


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far.

  Linux ``VmHWM`` (reset at exec, unlike ``ru_maxrss``, which a child process
  inherits from its parent); ``ru_maxrss`` elsewhere.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_stats() -> dict | None:
  """``memory_stats()`` of the default device (GPU/TPU); ``None`` on CPU."""
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None


def tree_bytes(tree) -> int:
  """Bytes of all array leaves of ``tree`` (``MaskedNode``/``None`` count 0)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype"))


def compile_time(jitted, *args) -> tuple[float, object]:
  """Seconds to lower and compile ``jitted`` for ``args``; and the executable."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return time.perf_counter() - t0, compiled


def memory_analysis(compiled) -> dict | None:
  """XLA's static buffer sizes of a compiled executable (bytes), if available."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


# XLA:CPU's multi-output fusion pass (off by default; process-wide, set before JAX starts).
MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


def run_with_xla_flag(module: str, args: list[str], flag: str = MOF_FLAG) -> dict:
  """Runs ``python -m benchmarks.<module> *args --json F`` in a fresh process
  with ``flag`` added to ``XLA_FLAGS``; returns the JSON it wrote to F."""
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "out.json")
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args, "--json", path],
                   env=env, cwd=root, check=True)
    with open(path) as f:
      return json.load(f)


def cli(run: Callable[[bool], dict]) -> None:
  """``python -m benchmarks.<module> [--quick] [--json F]``: runs ``run(quick)``
  and writes its results to F (else prints the start of them)."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--json", default=None, help="write the full results here")
  a = ap.parse_args()
  out = run(a.quick)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, default=float)
  else:
    print(json.dumps(out, default=float)[:3000])
