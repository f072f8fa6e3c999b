"""Test setup: 8 host CPU devices for the multi-device tests (set before JAX starts)."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

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
