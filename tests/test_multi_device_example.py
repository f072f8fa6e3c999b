"""examples/multi_device.py runs: as a script on 8 CPU devices, and in-process
(data parallel and FSDP agree; a checkpointed, resumed run is bit-identical)."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from examples import multi_device

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6


def test_script_runs_fsdp_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "examples.multi_device", "--mode", "fsdp",
                        "--steps", "2", "--global_batch", "16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "fsdp: 8 devices, 1 process(es)" in out.stdout
  assert "step    2  loss" in out.stdout


def test_data_parallel_and_fsdp_agree():
  dp = multi_device.train("dp", steps=STEPS, verbose=False)
  fsdp = multi_device.train("fsdp", steps=STEPS, verbose=False)
  conv = fsdp["params"]["conv2"]["kernel"]
  assert conv.sharding.spec == ("data",) or conv.sharding.spec[-1] == "data"
  assert len(conv.addressable_shards) == 8 and conv.addressable_shards[0].data.shape[-1] == 2
  assert np.isfinite(dp["loss"]) and abs(dp["loss"] - fsdp["loss"]) < 1e-5
  a = jax.device_get((dp["params"], dp["opt_state"]))
  b = jax.device_get((fsdp["params"], fsdp["opt_state"]))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


def test_checkpoint_resume_is_bit_identical(tmp_path):
  want = multi_device.train("fsdp", steps=STEPS, verbose=False)
  ckpt = str(tmp_path / "ckpt")
  multi_device.train("fsdp", steps=STEPS // 2, checkpoint_dir=ckpt, save_every=STEPS,
                     verbose=False)                     # "interrupted": saved at STEPS/2
  got = multi_device.train("fsdp", steps=STEPS, checkpoint_dir=ckpt, verbose=False)
  a = jax.device_get((want["params"], want["opt_state"]))
  b = jax.device_get((got["params"], got["opt_state"]))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_scaling_doc_snippets_run_in_order():
  """The ```python blocks of docs/scaling.md run, in order, in one namespace
  (```py blocks need several hosts or the shard_map option and are shown only)."""
  import re
  doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
  blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
  assert len(blocks) >= 5
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/scaling.md[python block {i}]", "exec"), namespace)
  assert int(namespace["step"]) == 3
