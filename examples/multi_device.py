r"""Data-parallel and FSDP training with SplitLBI on many devices and hosts.

Usage (8 simulated devices on one CPU; on GPUs/TPUs drop the XLA_FLAGS)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m examples.multi_device --mode fsdp --steps 30
    python -m examples.multi_device --mode dp --checkpoint_dir /tmp/lbi_ckpt

One ``jax.jit``-compiled train step serves every layout; only the shardings
of the inputs change (GSPMD partitions the step):

- ``--mode dp``: data parallel. Parameters and optimizer state replicated,
  every batch split along the mesh axis ``"data"``.
- ``--mode fsdp``: fully sharded. Every kernel (and with it b, V, Γ of the
  SplitLBI state) is split along its group-index axis (conv output filters,
  dense output neurons) over the same axis, so each device stores 1/N of the
  parameters and of the state; batches are split as in ``dp``. Any axis
  works under ``jit``, a reduced (in-group) axis included: the group norms
  ‖V_g‖ of the prox are computed over the whole, global filter.

Multi-host (one process per host, same command on each; see
docs/scaling.md): ``--coordinator HOST:PORT --num_processes N --process_id I``
(or ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``),
or ``--multihost`` alone where ``jax.distributed.initialize()`` detects them
(SLURM, Open MPI, Cloud TPU, GKE), join the job first
(:mod:`examples.distributed`, shared with ``examples.train``). Each process builds only
its own rows of every global batch and assembles the global array with
``jax.make_array_from_process_local_data``; the mesh spans
``jax.devices()``, all devices of all hosts. With ``--checkpoint_dir``
(orbax; every process calls save/restore, each writes its own shards) a
rerun resumes from the latest checkpoint, bit-identically.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_splitlbi as sl
from examples import distributed, train_steps

NUM_CLASSES = 8


def init_params(seed: int = 0, width: int = 16) -> dict:
  """A tiny conv (HWIO, one group per output filter) + dense (lasso) net.

  He-normal from a NumPy seed: identical on every host, no device work.
  """
  rng = np.random.default_rng(seed)
  he = lambda shape, fan_in: (rng.normal(size=shape) * math.sqrt(2 / fan_in)).astype(np.float32)
  zeros = lambda n: np.zeros(n, np.float32)
  return {
      "conv1": {"kernel": he((3, 3, 3, width), 27), "bias": zeros(width)},
      "conv2": {"kernel": he((3, 3, width, width), 9 * width), "bias": zeros(width)},
      "head": {"kernel": he((width, NUM_CLASSES), width), "bias": zeros(NUM_CLASSES)},
  }


def apply(params: dict, x: jax.Array) -> jax.Array:
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                           padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(conv(x, params["conv1"]["kernel"]) + params["conv1"]["bias"])
  h = jax.nn.relu(conv(h, params["conv2"]["kernel"]) + params["conv2"]["bias"])
  return h.mean((1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


class TinyNet:
  """:func:`apply` with Linen's ``apply(variables, x, train)``, for the shared step."""

  @staticmethod
  def apply(variables: dict, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no BatchNorm
    return apply(variables["params"], x)


def local_batch(step: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """THIS process's rows of the global batch of ``step`` (synthetic data).

  The global batch is a pure function of ``step``: a resumed run, and a run
  on any number of processes, sees the same data. The labels come from a
  fixed random "teacher" of the mean colour.
  """
  rows = global_batch // jax.process_count()
  start = jax.process_index() * rows  # processes own consecutive rows (data_mesh)
  x = np.random.default_rng(step).normal(size=(global_batch, 8, 8, 3))[start:start + rows]
  x = x.astype(np.float32)
  teacher = np.random.default_rng(0).normal(size=(3, NUM_CLASSES))
  y = (x.mean((1, 2)) @ teacher).argmax(-1).astype(np.int32)
  return x, y


LAYOUTS = {"dp": "replicated", "fsdp": "fsdp"}  # --mode: distributed.tree_shardings layout


@functools.cache  # one optimizer and one jitted step per process: compiled once
def make_optimizer(learning_rate: float = 0.1) -> optax.GradientTransformation:
  return sl.splitlbi(learning_rate, kappa=1.0, nu=10.0, lam=0.3, momentum=0.9,
                     weight_decay=1e-4, record_path=True)


@functools.cache
def make_train_step(opt: optax.GradientTransformation):
  """The one train step of every layout (:func:`examples.train_steps.make_train_step`);
  params and state are donated.

  Returns:
    ``train_step(params, opt_state, x, y) -> (params, opt_state, loss)``, jitted.
  """
  step = train_steps.make_train_step(TinyNet(), opt)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, x, y):
    state, metrics = step(train_steps.TrainState(params, {}, opt_state), {"image": x, "label": y})
    return state.params, state.opt_state, metrics["loss"]

  return train_step


def bytes_per_device(tree: Any) -> int:
  """Bytes that device 0 holds of ``tree`` (1/N of it for a sharded leaf)."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def train(mode: str = "dp", steps: int = 30, global_batch: int = 32,
          checkpoint_dir: str | None = None, save_every: int = 10,
          log_every: int = 5, verbose: bool = True, num_devices: int | None = None) -> dict:
  """Trains the tiny net with SplitLBI on all (or ``num_devices``) devices;
  returns final metrics."""
  mesh = distributed.data_mesh(num_devices)
  n = mesh.size
  if global_batch % n:
    raise ValueError(f"global_batch={global_batch} must be a multiple of the "
                     f"device count {n}.")
  if mode not in LAYOUTS:
    raise ValueError(f"mode must be one of {tuple(LAYOUTS)}, got {mode!r}.")
  data_sharding = NamedSharding(mesh, P("data"))
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)  # one log per job

  params = init_params(0)  # the same on every process (same seed)
  # dp: all replicated; fsdp: each kernel split on its last (group-index) axis
  # when n divides it, so every device holds whole filters / neurons.
  params = jax.device_put(params, distributed.tree_shardings(params, mesh, LAYOUTS[mode]))
  opt = make_optimizer()
  opt_state = opt.init(params)  # b, V, Γ take the sharding of their parameter
  train_step = make_train_step(opt)

  start, mngr = 0, None
  if checkpoint_dir is not None:
    import orbax.checkpoint as ocp  # optional dependency (the [examples] extra)
    mngr = ocp.CheckpointManager(checkpoint_dir,
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))
    if mngr.latest_step() is not None:
      # The abstract target carries shapes, dtypes, shardings and the state's
      # static nodes (penalties, κ, λ); restoring lays the arrays out on it
      # (leaves not on the mesh, e.g. the step count, go replicated).
      def on_mesh(x):
        sharding = x.sharding if isinstance(x.sharding, NamedSharding) else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
      replicated = NamedSharding(mesh, P())
      target = jax.tree.map(on_mesh, {"params": params, "opt_state": opt_state})
      start = mngr.latest_step()
      restored = mngr.restore(start, args=ocp.args.StandardRestore(target))
      params, opt_state = restored["params"], restored["opt_state"]
      if verbose:
        say(f"resumed from step {start}")

  if verbose:
    say(f"{mode}: {n} devices, {jax.process_count()} process(es); per device: "
          f"params {bytes_per_device(params)} B, state {bytes_per_device(opt_state)} B")
  loss = float("nan")
  for step in range(start, steps):
    x, y = local_batch(step, global_batch)
    x = jax.make_array_from_process_local_data(data_sharding, x)
    y = jax.make_array_from_process_local_data(data_sharding, y)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    if mngr is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
      mngr.save(step + 1, args=ocp.args.StandardSave(
          {"params": params, "opt_state": opt_state}))
      mngr.wait_until_finished()  # before the next step donates the buffers
    if verbose and ((step + 1) % log_every == 0 or step + 1 == steps):
      say(f"step {step + 1:4d}  loss {float(loss):.4f}  "  # every process gathers
          f"filters in supp Γ: {filters_in_support(opt_state)}")
  if mngr is not None:
    mngr.close()
  return {"loss": float(loss), "params": params, "opt_state": opt_state,
          "filters_in_support": filters_in_support(opt_state)}


def filters_in_support(opt_state: Any) -> dict[str, str]:
  """Per conv kernel, 'k/n' output filters with Γ ≠ 0 (from the path record)."""
  entry = distributed.fetch(sl.find_state(opt_state).entry)  # all processes call it
  out = {}
  for name in ("conv1", "conv2"):
    e = entry[name]["kernel"]
    out[name] = f"{int((e >= 0).sum())}/{e.size}"
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=["dp", "fsdp"], default="dp")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--global_batch", type=int, default=32)
  parser.add_argument("--checkpoint_dir", default=None)
  parser.add_argument("--save_every", type=int, default=10)
  distributed.add_flags(parser)  # --multihost, --coordinator, --num_processes, ...
  args = parser.parse_args(argv)
  distributed.initialize(distributed.options_from_args(args))  # before any JAX backend use
  return train(args.mode, args.steps, args.global_batch, args.checkpoint_dir, args.save_every)


if __name__ == "__main__":
  main()
