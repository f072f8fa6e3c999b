"""pytest plugin of ``tools.device_check``'s test run (``-p tools.device_pytest_plugin``).

Loaded in every pytest process (pytest-xdist workers too), before the test
modules: registers the hypothesis profile ``device`` (``max_examples`` from
``DEVICE_CHECK_HYPOTHESIS_EXAMPLES``; tests/test_prox.py loads the profile
named by ``HYPOTHESIS_PROFILE``), and at the end prints the JAX backend the
tests ran on as ``DEVICE_CHECK_BACKEND <backend> <device kind>``.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile(
    "device", max_examples=int(os.environ.get("DEVICE_CHECK_HYPOTHESIS_EXAMPLES", "20")),
    deadline=None, derandomize=True)


def pytest_sessionfinish(session):
  if hasattr(session.config, "workerinput"):  # an xdist worker: the controller reports
    return
  import jax  # pylint: disable=import-outside-toplevel
  print(f"\nDEVICE_CHECK_BACKEND {jax.default_backend()} {jax.devices()[0].device_kind}",
        flush=True)
