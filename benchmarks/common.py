"""The timer and the machine helpers every benchmark shares.

Timings are taken round-robin ("interleaved"): every round runs each candidate
once, in a shuffled order, so machine-wide slowdowns (other processes, VM
stalls) hit all candidates alike; we report medians, interquartile ranges and
ratios of medians.

One timed *sample* of a :class:`Stepper` is ``calls`` consecutive calls (each
consuming the previous call's donated outputs) followed by
``jax.block_until_ready`` on the outputs, divided by ``calls``. On CPU a sample
is one call; on an accelerator, whose calls are asynchronous and short,
:func:`calibrate` picks ``calls`` so that a sample lasts about ``target_s``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
import random
import re
import resource
import subprocess
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_CALLS = 200


class Timed(Protocol):
  """Anything :func:`interleaved` can time: ``run()`` returns seconds per call."""

  def run(self) -> float: ...


class Stepper:
  """Times a jitted step that consumes (donates) and returns its own state.

  ``fn(*state, *const) -> new_state`` (a tuple of the same structure as
  ``state``). :meth:`run` makes ``calls`` chained calls, waits for the last
  outputs and returns the seconds per call.
  """

  def __init__(self, fn: Callable, state: tuple, const: tuple = (), calls: int = 1):
    self.fn, self.state, self.const, self.calls = fn, tuple(state), tuple(const), calls

  def run(self) -> float:
    t0 = time.perf_counter()
    state = self.state
    for _ in range(self.calls):
      state = tuple(self.fn(*state, *self.const))
    jax.block_until_ready(state)
    self.state = state
    return (time.perf_counter() - t0) / self.calls


class Call:
  """Times a pure jitted call ``fn(*args)`` (nothing donated) until its outputs are ready."""

  def __init__(self, fn: Callable, *args: Any):
    self.fn, self.args = fn, args
    jax.block_until_ready(self.fn(*self.args))  # compiled outside the timings

  def run(self) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(self.fn(*self.args))
    return time.perf_counter() - t0


class Timing(NamedTuple):
  """How samples are taken: ``sample_s`` None = one call per sample (CPU)."""

  sample_s: float | None = None
  warmup: int = 2


CPU = Timing()
DEVICE = Timing(sample_s=0.03, warmup=1)
DEVICE_SMOKE = Timing(sample_s=0.003, warmup=1)


def calibrate(steppers: dict[str, Stepper], target_s: float) -> dict[str, int]:
  """Warms every stepper up and sets its ``calls`` so a sample lasts ~``target_s``."""
  for s in steppers.values():
    s.calls = 1
    s.run()
    per_call = min(s.run(), s.run())
    s.calls = max(1, min(MAX_CALLS, math.ceil(target_s / max(per_call, 1e-7))))
  return {n: s.calls for n, s in steppers.items()}


def interleaved(steppers: dict[str, Timed], rounds: int, warmup: int = 2,
                seed: int = 0) -> dict[str, list[float]]:
  """Times ``rounds`` samples of every candidate, round-robin in shuffled order."""
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


def timed(steppers: dict[str, Stepper], rounds: int, timing: Timing) -> dict[str, list[float]]:
  """:func:`interleaved` after :func:`calibrate` where ``timing`` asks for it."""
  if timing.sample_s is not None:
    calibrate(steppers, timing.sample_s)
  return interleaved(steppers, rounds, warmup=timing.warmup)


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


def compile_time(jitted, *args) -> tuple[float, Any]:
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


def tree_bytes(tree) -> int:
  """Bytes of all array leaves of ``tree`` (``MaskedNode``/``None`` count 0)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype"))


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


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      return int(f.readline().split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    return None


def machine_info() -> dict:
  """CPU model, cores, memory, versions, JAX devices and the device's memory limit."""
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  return {
      "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_bytes": _memory_bytes(),
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": jaxlib.__version__, "optax": optax.__version__, "flax": flax.__version__,
      "numpy": np.__version__, "platform": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "bytes_limit": (device_memory_stats() or {}).get("bytes_limit"),
      "default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None)),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
  }


VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "flax", "optax", "chex", "numpy", "pytest", "hypothesis")


def host_info() -> dict:
  """Python, package versions, GPU name / driver / CUDA from nvidia-smi (no JAX start)."""
  versions = {}
  for name in VERSIONS:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, timeout=10,
                            capture_output=True, text=True).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"python": platform.python_version(), "hostname_platform": platform.platform(),
          "versions": versions, "nvidia_smi": _nvidia_smi(), "git_commit": commit,
          "package_sha256": package_hash()}


def package_hash() -> str:
  """sha256 of the package's source files: names the code run even where the copy's
  ``.git`` is stale (a device machine gets the working tree, not the commits)."""
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
