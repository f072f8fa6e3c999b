r"""Multi-process startup and parameter layouts shared by the example trainers.

One process per host (or per GPU) runs the same program; ``initialize`` joins
them into one JAX job *before any JAX backend use*, from flags or the
environment:

==================  ============================  ===================================
flag                environment variable          meaning
==================  ============================  ===================================
``--coordinator``   ``JAX_COORDINATOR_ADDRESS``   ``host:port`` of process 0
``--num_processes`` ``JAX_NUM_PROCESSES``         processes in the job
``--process_id``    ``JAX_PROCESS_ID``            this process, ``0 .. N-1``
``--multihost``     (none)                        join a job even if none of the above
                                                  is given: ``jax.distributed``
                                                  detects them on SLURM, Open MPI,
                                                  Cloud TPU and GKE
``--cpu_collectives`` (none)                      ``gloo`` or ``mpi``: cross-process
                                                  collectives of the CPU backend
``--local_device_count`` (none)                   CPU devices of this process (tests)
==================  ============================  ===================================

``JAX_COORDINATOR_ADDRESS`` is also read by ``jax.distributed`` itself;
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are this project's names. Any
value left unset is auto-detected by ``jax.distributed.initialize``. Without
flags or variables the program stays a single process.

Layouts: ``partition_spec`` / ``tree_shardings`` give the ``"replicated"``
(data parallel) or ``"fsdp"`` layout of any pytree by leaf shape, and
``fetch`` reads (possibly sharded, multi-host) arrays to NumPy on every process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PARAM_SHARDINGS = ("replicated", "fsdp")


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
  """How this process joins a multi-process job (``None``: unset)."""

  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  multihost: bool = False
  cpu_collectives: Optional[str] = None
  local_device_count: Optional[int] = None

  @property
  def joins_job(self) -> bool:
    """Whether ``jax.distributed.initialize`` is to be called."""
    return self.multihost or any(
        v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds the multi-process flags (see the module docstring) to ``parser``."""
  group = parser.add_argument_group(
      "multi-process", "one process per host; unset values come from JAX_COORDINATOR_ADDRESS, "
      "JAX_NUM_PROCESSES, JAX_PROCESS_ID or the cluster (SLURM, Open MPI, Cloud TPU, GKE)")
  group.add_argument("--coordinator", dest="coordinator_address", default=None,
                     metavar="HOST:PORT", help="address of process 0's coordinator")
  group.add_argument("--num_processes", type=int, default=None, help="processes in the job")
  group.add_argument("--process_id", type=int, default=None, help="this process's index")
  group.add_argument("--multihost", action="store_true",
                     help="join a job even without the values above (cluster auto-detection)")
  group.add_argument("--cpu_collectives", choices=("gloo", "mpi"), default=None,
                     help="cross-process collectives of the CPU backend")
  group.add_argument("--local_device_count", type=int, default=None,
                     help="CPU devices in this process (tests; GPUs/TPUs ignore it)")


def _env_int(name: str) -> Optional[int]:
  text = os.environ.get(name)
  if text in (None, ""):
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"environment variable {name}={text!r} is not an integer.") from None


def options_from_args(args: argparse.Namespace) -> ProcessOptions:
  """Flags from ``add_flags``, falling back to the environment variables."""
  return ProcessOptions(
      coordinator_address=args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
      or None,
      num_processes=(args.num_processes if args.num_processes is not None
                     else _env_int("JAX_NUM_PROCESSES")),
      process_id=args.process_id if args.process_id is not None else _env_int("JAX_PROCESS_ID"),
      multihost=args.multihost, cpu_collectives=args.cpu_collectives,
      local_device_count=args.local_device_count)


def _set_before_backend(name: str, value: Any, flag: str) -> None:
  """``jax.config.update`` of a setting that must precede backend start-up."""
  if getattr(jax.config, name) == value:
    return
  if jax._src.xla_bridge.backends_are_initialized():  # pylint: disable=protected-access
    raise RuntimeError(f"{flag}={value!r} must be applied before JAX starts its backend; "
                       "call examples.distributed.initialize first.")
  jax.config.update(name, value)


def initialize(options: ProcessOptions) -> bool:
  """Joins the multi-process job that ``options`` describe, once per process.

  Call it before anything that starts a JAX backend (``jax.devices()``, any
  computation). Calling it again with the same options does nothing.

  Args:
    options: from ``options_from_args`` (or built directly).

  Returns:
    whether this process is part of a multi-process job.

  Raises:
    ValueError: for a negative or zero count, or a process id outside the job.
  """
  for what in ("num_processes", "local_device_count"):
    value = getattr(options, what)
    if value is not None and value < 1:
      raise ValueError(f"{what} must be >= 1, got {value}.")
  if options.process_id is not None and options.num_processes is not None and not (
      0 <= options.process_id < options.num_processes):
    raise ValueError(f"process_id must be in [0, num_processes={options.num_processes}), "
                     f"got {options.process_id}.")
  if options.local_device_count is not None:
    _set_before_backend("jax_num_cpu_devices", options.local_device_count,
                        "local_device_count")
  if options.cpu_collectives is not None:
    _set_before_backend("jax_cpu_collectives_implementation", options.cpu_collectives,
                        "cpu_collectives")
  if not options.joins_job:
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(options.coordinator_address, options.num_processes,
                               options.process_id)
  elif options.num_processes is not None and jax.process_count() != options.num_processes:
    raise RuntimeError(f"already part of a {jax.process_count()}-process job, "
                       f"not of num_processes={options.num_processes}.")
  return True


# ------------------------------------------------------------------------- layouts


def partition_spec(shape: tuple[int, ...], param_sharding: str, num_devices: int,
                   axis: str = "data") -> P:
  """The ``PartitionSpec`` of a leaf of ``shape`` in a layout.

  ``"replicated"``: ``P()`` (data parallel). ``"fsdp"``: the last axis is split
  over ``axis`` for leaves of ndim ≥ 2 whose last dimension ``num_devices``
  divides: conv kernels (HWIO) on their output filters and dense kernels
  (in, out) on their output neurons, i.e. on the group-index axis, so every
  device holds whole filters; other leaves are replicated. A state leaf shaped
  like its parameter (b, V, Γ) gets the parameter's spec.
  """
  if param_sharding not in PARAM_SHARDINGS:
    raise ValueError(f"param_sharding must be one of {PARAM_SHARDINGS}, got {param_sharding!r}.")
  if param_sharding == "fsdp" and len(shape) >= 2 and shape[-1] % num_devices == 0:
    return P(*([None] * (len(shape) - 1)), axis)
  return P()


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh, param_sharding: str,
                   axis: str = "data") -> Any:
  """``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s)."""
  n = mesh.shape[axis]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, partition_spec(np.shape(x), param_sharding, n, axis)), tree)


def _identity(tree):
  return tree


def fetch(tree: Any) -> Any:
  """``tree`` as NumPy arrays on every process.

  A leaf split over several processes is first all-gathered (a collective:
  every process must call ``fetch`` with the same tree); other leaves are
  copied from a local shard.
  """
  leaves, treedef = jax.tree.flatten(tree)
  remote = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
            and not x.is_fully_addressable and not x.is_fully_replicated]
  for i in [i for i in remote if not isinstance(leaves[i].sharding, NamedSharding)]:
    leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
  remote = [i for i in remote if isinstance(leaves[i], jax.Array)]
  if remote:
    out_shardings = tuple(leaves[i].sharding.update(spec=P()) for i in remote)
    gathered = jax.jit(_identity, out_shardings=out_shardings)(tuple(leaves[i] for i in remote))
    for i, x in zip(remote, gathered):
      leaves[i] = x
  return treedef.unflatten([np.asarray(x) for x in leaves])


def data_mesh(num_devices: Optional[int] = None, axis: str = "data") -> jax.sharding.Mesh:
  """A 1-D mesh ``(axis,)`` over the first ``num_devices`` devices of the job.

  All devices of all processes by default (``jax.devices()`` lists them
  process by process, so process p's rows of a batch follow process p-1's).
  The axis is ``Auto``: GSPMD partitions the step from the input shardings.

  Raises:
    ValueError: if ``num_devices`` exceeds the devices, or leaves some out in
      a multi-process job (every process must own part of the mesh).
  """
  devices = jax.devices()
  n = num_devices or len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n} but {len(devices)} devices are available.")
  if n != len(devices) and jax.process_count() > 1:
    raise ValueError(f"num_devices={n}: a {jax.process_count()}-process job uses all "
                     f"{len(devices)} devices (leave num_devices unset).")
  return jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])
