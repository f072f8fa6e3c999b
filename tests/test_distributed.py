"""examples/distributed.py in one process: flags and environment, validation,
layouts, mesh and fetch (the 2-process job itself: tests/test_multihost.py)."""

import argparse

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples import configs, distributed, train


def parse(argv):
  parser = argparse.ArgumentParser()
  distributed.add_flags(parser)
  return distributed.options_from_args(parser.parse_args(argv))


def test_flags_then_environment_then_nothing(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  none = parse([])
  assert none == distributed.ProcessOptions() and not none.joins_job
  assert parse(["--multihost"]).joins_job  # cluster auto-detection

  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  env = parse([])
  assert (env.coordinator_address, env.num_processes, env.process_id) == ("10.0.0.1:1234", 4, 3)
  assert env.joins_job
  flags = parse(["--coordinator", "h:1", "--num_processes", "2", "--process_id", "0",
                 "--cpu_collectives", "gloo", "--local_device_count", "2"])
  assert flags == distributed.ProcessOptions("h:1", 2, 0, False, "gloo", 2)

  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one'"):
    parse([])


@pytest.mark.parametrize("options, match", [
    (dict(num_processes=0), "num_processes must be >= 1"),
    (dict(local_device_count=0), "local_device_count must be >= 1"),
    (dict(num_processes=2, process_id=2), r"process_id must be in \[0, num_processes=2\)"),
])
def test_initialize_rejects_bad_values(options, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(distributed.ProcessOptions(**options))


def test_initialize_single_process_and_too_late_settings():
  jax.devices()  # the backend is running (8 CPU devices, conftest)
  assert distributed.initialize(distributed.ProcessOptions()) is False
  # Already the value in force: nothing to do.
  assert distributed.initialize(distributed.ProcessOptions(cpu_collectives="gloo")) is False
  with pytest.raises(RuntimeError, match="local_device_count=4 must be applied before"):
    distributed.initialize(distributed.ProcessOptions(local_device_count=4))
  with pytest.raises(RuntimeError, match="cpu_collectives='mpi' must be applied before"):
    distributed.initialize(distributed.ProcessOptions(cpu_collectives="mpi"))


def test_partition_spec_by_shape():
  spec = distributed.partition_spec
  assert spec((3, 3, 8, 16), "fsdp", 4) == P(None, None, None, "data")  # conv filters
  assert spec((64, 12), "fsdp", 4) == P(None, "data")                   # dense neurons
  assert spec((64, 10), "fsdp", 4) == P()                               # 4 ∤ 10
  assert spec((16,), "fsdp", 4) == P()                                  # biases
  assert spec((3, 3, 8, 16), "replicated", 4) == P()
  with pytest.raises(ValueError, match="param_sharding must be one of"):
    spec((3, 3), "tensor", 4)


def test_data_mesh_and_fetch(monkeypatch):
  mesh = distributed.data_mesh(4)
  assert mesh.devices.tolist() == jax.devices()[:4] and mesh.axis_names == ("data",)
  with pytest.raises(ValueError, match="num_devices=9 but 8 devices"):
    distributed.data_mesh(9)
  tree = {"w": np.arange(24.0).reshape(2, 12), "b": np.ones(3)}
  placed = jax.device_put(tree, distributed.tree_shardings(tree, mesh, "fsdp"))
  assert placed["w"].sharding.spec == P(None, "data") and placed["b"].sharding.spec == P()
  got = distributed.fetch(placed)
  assert all(isinstance(x, np.ndarray) for x in got.values())
  np.testing.assert_array_equal(got["w"], tree["w"])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="num_devices=4: a 2-process job uses all 8"):
    distributed.data_mesh(4)


def test_trainer_rejects_unknown_param_sharding():
  cfg = configs.get_config("digits").replace(param_sharding="zero3", epochs=1, progress=False)
  with pytest.raises(ValueError, match="param_sharding must be one of"):
    train.train_and_evaluate(cfg, None, verbose=False)
