"""Test setup, before JAX starts: 8 host CPU devices for the multi-device tests,
unoptimised XLA:CPU machine code, and one compilation cache for the whole run.

Compiling, not running, is most of the suite's time (its arrays are small), and
most of a compile is LLVM optimising the kernels: ``--xla_backend_optimization_level=0``
cuts the suite's time by about a third. It changes no HLO pass (fusion, layout),
only the machine code; a caller's own level in ``XLA_FLAGS`` is kept.

The cache (``JAX_COMPILATION_CACHE_DIR``, a fresh folder per run unless the caller
sets one) lets the xdist workers and the processes tests spawn reuse programs that
another test already compiled (the same model's step built by a new closure, a
fresh process loading a saved model); XLA:CPU compiles dominate the suite's time.
The folder is removed when the run ends.
"""

import os
import shutil
import tempfile
import uuid

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags = (flags + " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in flags:
  flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set in the controller before xdist starts its workers, which inherit it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"optax_splitlbi_tests_{uuid.uuid4().hex}")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


def pytest_unconfigure(config):
  """The run's cache goes with the run (the controller, or a run without xdist)."""
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(params=["equations", "buffered", "fused"])
def update_form(request):
  """The ``xla_cpu_form`` passed to ``splitlbi``: every spelling of the update.

  "equations" is exactly the code GPU and TPU run (so it is checked here, on
  CPU, against the same references); "buffered" and "fused" are the XLA:CPU
  forms of ``optax_splitlbi._xla_cpu``. This process's XLA runs without the
  multi-output fusion flag, so "fused" exercises its numbers, not its kernels
  (``test_fusion.py`` checks those in a fresh process with the flag).
  """
  return request.param
