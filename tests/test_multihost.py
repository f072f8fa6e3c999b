"""Multi-process training, for real, on one machine (issue 13).

Two processes of two CPU devices each (``XLA_FLAGS=
--xla_force_host_platform_device_count=2``, gloo collectives,
``jax.distributed.initialize("127.0.0.1:PORT", 2, i)``) form one 4-device
job and run ``python -m examples.train``'s code (the CLI's own flags, via
``examples.train.main``) on the digits CNN: data parallel, FSDP, and a run
resumed from a checkpoint written by one process. This process runs the same
configs as one process on 4 of its 8 devices and checks that params, V, Γ,
masks (and every other state leaf) and the evaluation metrics agree, reading
the 2-process runs through their orbax checkpoints (2 processes write, 1
restores) while the resumed run restores a 1-process checkpoint in 2
processes.

Tolerance: both jobs run the same partitioned program on the same 4 batch
shards, so each device computes the same local gradient; only the cross-device
all-reduce differs (gloo between processes vs. XLA:CPU's in-process
reduction), and it sums the 4 partial gradients in another order (a jitted
4-way sum of random float32 rows differs in the last bit in 27 % of the
entries between the two). So the float leaves (params, momentum, V, Γ) differ
by rounding: measured up to 3e-8 (1-3 ulp) after 6-9 steps, while the integer
leaves (step count, path records) and the first epoch's metrics are
identical. We allow rtol 1e-5, atol 1e-6 and require the masks supp Γ to be
identical (a flip would need a ‖V_g‖ or |V| within ~1e-7 of λ).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_splitlbi as sl
from examples import configs, multi_device, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
JOB_TIMEOUT_S = 300  # the whole 2-process job; it takes ~30-60 s on 2 busy cores
RTOL, ATOL = 1e-5, 1e-6

# 3 steps per epoch of 16 examples; ν = 1 and these λ let some filters and
# weights (not all) of several layers enter supp Γ within 6-9 steps.
SETTINGS = ["epochs=2", "max_steps_per_epoch=3", "batch_size=16", "eval_batch_size=40",
            "eval_examples=90", "nu=1.0", "conv_lam=0.17", "fc_lam=0.03", "decay_every=100",
            "progress=False"]

# Runs of the 2-process job: (name, layout, epochs). "resume" starts from a
# copy of the 1-process fsdp run's workdir (checkpoint of epoch 2).
JOB = [("dp", "replicated", 2), ("fsdp", "fsdp", 2), ("resume", "fsdp", 3)]

# examples.multi_device in the same job: --mode fsdp, 25 steps of batch 16
# (some conv filters have entered supp Γ by then, not all).
MULTI_DEVICE = ["--mode", "fsdp", "--steps", "25", "--global_batch", "16"]

# Runs the CLI entry points (train.main / multi_device.main) once per task,
# all in one process of one jax.distributed job; prints what the test checks
# of this process's shards and (multi_device) writes the final state to .npz.
WORKER = r"""
import json, sys
import jax, numpy as np
import optax_splitlbi as sl
from examples import distributed, multi_device, train
for task in json.loads(sys.argv[1]):
  if task["module"] == "train":
    state = train.main(task["argv"])["state"]
    params, opt_state, layer = state.params, state.opt_state, "Conv_1"
  else:
    out = multi_device.main(task["argv"])
    params, opt_state, layer = out["params"], out["opt_state"], "conv2"
    host = distributed.fetch({"params": params, "v": sl.find_state(opt_state).v,
                              "gamma": sl.gamma(opt_state), "masks": sl.support(opt_state)})
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(host)[0]}
    if jax.process_index() == 0:
      np.savez(task["dump"], **flat)
  kernel = params[layer]["kernel"]
  v = sl.find_state(opt_state).v[layer]["kernel"]
  print("RESULT " + json.dumps({
      "task": task["name"], "process": jax.process_index(),
      "processes": jax.process_count(), "devices": jax.device_count(),
      "kernel_spec": str(kernel.sharding.spec), "v_spec": str(v.sharding.spec),
      "local_shard": list(kernel.addressable_shards[0].data.shape)}), flush=True)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def argv_for(workdir: pathlib.Path, layout: str, epochs: int, extra=()) -> list[str]:
  return ["--quiet", "--workdir", str(workdir), "--set", *SETTINGS,
          f"param_sharding={layout}", f"epochs={epochs}", *extra]


def config_for(layout: str, epochs: int):
  return configs.apply_overrides(configs.get_config("digits"),
                                 [*SETTINGS, f"param_sharding={layout}", f"epochs={epochs}",
                                  "num_devices=4"])


@contextlib.contextmanager
def launched(tasks: list[dict], logdir: pathlib.Path):
  """Starts the 2-process job; always kills both process groups on exit."""
  port, procs, logs = free_port(), [], []
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  try:
    for i in range(NUM_PROCESSES):
      flags = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(NUM_PROCESSES),
               "--process_id", str(i), "--cpu_collectives", "gloo"]
      logs.append(open(logdir / f"process{i}.log", "w+"))
      procs.append(subprocess.Popen(
          [sys.executable, "-c", WORKER,
           json.dumps([dict(t, argv=t["argv"] + flags) for t in tasks])],
          cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
          start_new_session=True))  # own process group: killed as a whole below
    yield procs, logs
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait(timeout=30)
    for f in logs:
      f.close()


def wait_all(procs, logs, timeout_s: float) -> list[str]:
  """Waits until every process has exited, one has failed (the others would
  wait for it) or ``timeout_s`` has passed; returns their logs."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    codes = [p.poll() for p in procs]
    if None not in codes or any(c not in (None, 0) for c in codes):
      break
    time.sleep(0.2)
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
  for i, (p, out) in enumerate(zip(procs, outputs)):
    status = "still running at the timeout" if p.poll() is None else f"exit {p.returncode}"
    assert p.returncode == 0, f"process {i} {status}:\n{out[-4000:]}"
  return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """1-process references, the 2-process job, then the 1-process restores."""
  tmp = tmp_path_factory.mktemp("multihost")
  one = {name: tmp / f"one_{name}" for name, _, _ in JOB}
  two = {name: tmp / f"two_{name}" for name, _, _ in JOB}
  timings = {}

  t0 = time.perf_counter()
  reference = {}
  for name, layout, epochs in JOB[:2]:
    reference[name] = train.train_and_evaluate(config_for(layout, epochs), str(one[name]),
                                               verbose=False)
  shutil.copytree(one["fsdp"], one["resume"])  # both continue the same epoch-2 checkpoint
  shutil.copytree(one["fsdp"], two["resume"])
  timings["one_process_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  tasks = [dict(name=n, module="train", argv=argv_for(two[n], layout, e)) for n, layout, e in JOB]
  tasks.append(dict(name="multi_device", module="multi_device", argv=MULTI_DEVICE,
                    dump=str(tmp / "multi_device.npz")))
  with launched(tasks, tmp) as (procs, logs):
    outputs = wait_all(procs, logs, JOB_TIMEOUT_S)
  timings["two_process_job_s"] = time.perf_counter() - t0
  results = [json.loads(line[len("RESULT "):]) for out in outputs
             for line in out.splitlines() if line.startswith("RESULT ")]
  metrics = {}  # as the 2-process job wrote them
  for name in two:
    with open(two[name] / "metrics.jsonl") as f:
      metrics[name] = [json.loads(line) for line in f]

  t0 = time.perf_counter()
  reference["resume"] = train.train_and_evaluate(config_for("fsdp", 3), str(one["resume"]),
                                                 verbose=False)
  restored = {n: train.train_and_evaluate(config_for(layout, e), str(two[n]), verbose=False)
              for n, layout, e in JOB}  # nothing left to train: the restored state
  for n, _, e in JOB:  # they restored the 2-process checkpoint, trained nothing
    assert os.path.isdir(two[n] / "checkpoints" / str(e))
    assert restored[n]["history"] == metrics[n], n
  timings["restore_s"] = time.perf_counter() - t0
  print("timings", timings)
  return dict(reference=reference, restored=restored, results=results, metrics=metrics,
              multi_device=tmp / "multi_device.npz")


def flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]), initial=0.0)) for k in a)


@pytest.mark.parametrize("name", [name for name, _, _ in JOB])
def test_two_processes_equal_one_process(runs, name):
  want, got = runs["reference"][name]["state"], runs["restored"][name]["state"]
  assert int(sl.find_state(got.opt_state).count) == 3 * dict((n, e) for n, _, e in JOB)[name]
  a, b = flat(want), flat(got)
  assert a.keys() == b.keys() and len(a) > 20  # params, batch stats, b, V, Γ, entry, count
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    if np.issubdtype(a[k].dtype, np.floating):
      np.testing.assert_allclose(b[k], a[k], rtol=RTOL, atol=ATOL, err_msg=k)
    else:  # the step count and the path records (entry steps)
      np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  print(f"{name}: max |2-process - 1-process| over {len(a)} leaves: {max_abs_diff(a, b):.3g}")
  # V and Γ explicitly, and the masks exactly.
  for fn in (lambda s: sl.find_state(s).v, sl.gamma):
    va, vb = flat(fn(want.opt_state)), flat(fn(got.opt_state))
    assert va.keys() == vb.keys() and len(va) == 4
    for k in va:
      np.testing.assert_allclose(vb[k], va[k], rtol=RTOL, atol=ATOL, err_msg=k)
  ma, mb = flat(sl.support(want.opt_state)), flat(sl.support(got.opt_state))
  assert ma.keys() == mb.keys() and len(ma) == 4
  for k in ma:
    np.testing.assert_array_equal(mb[k], ma[k], err_msg=k)
  density = {k: float(m.mean()) for k, m in ma.items()}
  print(f"{name}: supp Γ density per layer {density}")
  assert sum(0 < d < 1 for d in density.values()) >= 2, density  # real thresholding


@pytest.mark.parametrize("name", [name for name, _, _ in JOB])
def test_two_process_metrics_equal_one_process(runs, name):
  """Training and evaluation sums combine over processes as over devices."""
  rows = runs["metrics"][name]
  want = runs["reference"][name]["history"]
  if name == "resume":  # epochs 1-2 came with the 1-process checkpoint, not retrained
    assert rows[:2] == want[:2]
  assert [r["epoch"] for r in rows] == [r["epoch"] for r in want]
  for r, w in zip(rows, want):
    for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
              "sparse_test_accuracy", "weight_density", "group_density"):
      assert r[k] == pytest.approx(w[k], rel=RTOL, abs=ATOL), (name, r["epoch"], k)


def test_two_process_job_was_sharded_as_asked(runs):
  got = {(r["task"], r["process"]): r for r in runs["results"]}
  assert len(got) == (len(JOB) + 1) * NUM_PROCESSES
  shapes = {"train": [3, 3, 16, 32], "multi_device": [3, 3, 16, 16]}  # Conv_1 / conv2
  for name, layout, _ in [*JOB, ("multi_device", "fsdp", 0)]:
    for i in range(NUM_PROCESSES):
      r = got[(name, i)]
      assert (r["processes"], r["devices"]) == (NUM_PROCESSES, NUM_PROCESSES * LOCAL_DEVICES)
      shape = shapes["multi_device" if name == "multi_device" else "train"]
      if layout == "fsdp":  # a quarter of the output filters per device
        assert r["kernel_spec"] == r["v_spec"] == str(P(None, None, None, "data"))
        assert r["local_shard"] == shape[:3] + [shape[3] // 4]
      else:
        assert r["kernel_spec"] == r["v_spec"] == str(P())
        assert r["local_shard"] == shape
  # The 1-process references are laid out the same way.
  ref = runs["reference"]["fsdp"]["state"]
  assert ref.params["Conv_1"]["kernel"].sharding.spec == P(None, None, None, "data")
  assert sl.find_state(ref.opt_state).v["Conv_1"]["kernel"].sharding.spec == P(
      None, None, None, "data")


def test_multi_device_script_two_processes_equal_one_process(runs):
  """examples.multi_device joined the same job: its final params, V, Γ and
  masks equal the same script's run in this one process on 4 devices."""
  want = multi_device.train("fsdp", steps=25, global_batch=16, verbose=False, num_devices=4)
  want = flat({"params": want["params"], "v": sl.find_state(want["opt_state"]).v,
               "gamma": sl.gamma(want["opt_state"]), "masks": sl.support(want["opt_state"])})
  with np.load(runs["multi_device"]) as f:
    got = dict(f)
  assert got.keys() == want.keys() and len(want) == 6 + 3 * 3
  for k in want:
    if k.startswith("masks/"):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    else:
      np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
  print(f"multi_device: max |2-process - 1-process| {max_abs_diff(want, got):.3g}")
  filters = want["masks/conv1/kernel"].reshape(-1, 16).all(0)
  assert 0 < filters.sum() < 16  # some filters entered supp Γ, not all
