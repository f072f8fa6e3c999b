"""Test setup: 8 host CPU devices for the multi-device tests (set before JAX starts)."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


@pytest.fixture(params=["line_by_line", "fused"])
def update_form(request, monkeypatch):
  """Which form of the update ``splitlbi`` traces on CPU.

  "fused" is the form traced when XLA:CPU's multi-output fusion flag is in
  ``XLA_FLAGS`` (read at trace time; this process's XLA started without it,
  so only the numbers are exercised, not the fusion).
  """
  flags = os.environ.get("XLA_FLAGS", "").replace(MOF_FLAG, "")
  monkeypatch.setenv("XLA_FLAGS", f"{flags} {MOF_FLAG}" if request.param == "fused" else flags)
  return request.param
