"""What a training run reads from and writes to its workdir.

- ``config.json``: the resolved config;
- ``metrics.jsonl`` / ``metrics.csv``: one row per epoch (:class:`MetricsLog`);
- ``norms.npz``: per-group ‖Γ_g‖ and ‖W_g‖ of every epoch, Fig. 1's solution
  path (:class:`NormsFile`);
- ``snapshots/epoch_XXXX.npz``: weights and BatchNorm statistics at chosen
  epochs (:func:`params_snapshots`, read back by :func:`load_snapshot`);
- ``masks/epoch_XXXX.npz``: supp Γ at chosen epochs (:func:`support_snapshots`,
  read back by :func:`load_masks`);
- ``checkpoints/``: orbax checkpoints of the train state.

Every process gathers what is written (a collective for sharded arrays);
process 0 writes, except checkpoints, where every process writes its shards.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import optax_splitlbi as slbi
from optax_splitlbi.penalties import path_str
from examples import distributed
from examples.configs.base import Config
from examples.train_steps import TrainState

Recorder = Callable[[int, TrainState], None]  # (epoch, state): writes that epoch's files


def flat(tree: Any) -> dict[str, Any]:
  """``{"Conv_0/kernel": leaf}`` for a (params-structured) tree; ``None`` leaves kept."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {path_str(p): v for p, v in leaves}


def prepare_workdir(config: Config, workdir: Optional[str]) -> Optional[str]:
  """The absolute ``workdir`` (created, with config.json from process 0), or ``None``."""
  if workdir:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
  return workdir


def save_npz(path: str, arrays: dict[str, Any]) -> None:
  """Writes ``arrays`` to ``path`` atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
  os.replace(tmp, path)


def load_masks(path: str, params: Any) -> Any:
  """Masks (params structure, ``None`` where the file has no entry) from an .npz.

  Args:
    path: a search run's ``masks/epoch_XXXX.npz``.
    params: the parameters (or their ``ShapeDtypeStruct``s) the masks are for.

  Returns:
    A tree of NumPy masks like ``params``.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"mask_from: {path!r} does not exist (write it with a "
                            "search run's save_masks_at).")
  with np.load(path) as f:
    stored = dict(f)
  leaves = flat(params)
  unknown = set(stored) - set(leaves)
  if unknown:
    raise ValueError(f"mask_from: {path!r} has masks for unknown leaves {sorted(unknown)}.")
  for k, m in stored.items():
    if m.shape != leaves[k].shape:
      raise ValueError(f"mask_from: mask {k!r} has shape {m.shape}, parameter {leaves[k].shape}.")
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  return treedef.unflatten([stored.get(path_str(p)) for p, _ in with_path])


def load_snapshot(path: str, params: Any, batch_stats: Any) -> tuple[Any, Any]:
  """Weights (and BatchNorm statistics) of a snapshot .npz, checked against the model.

  Returns:
    ``(params, batch_stats)`` with the structure and dtypes of the arguments.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from: {path!r} does not exist (write it with a "
                            "search run's save_params_at).")
  with np.load(path) as f:
    stored = dict(f)
  out = []
  for prefix, tree in (("params", params), ("batch_stats", batch_stats)):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    new = []
    for p, x in leaves:
      key = f"{prefix}/{path_str(p)}"
      if key not in stored or stored[key].shape != x.shape:
        raise ValueError(f"init_from: {path!r} lacks {key!r} with shape {x.shape}.")
      new.append(jnp.asarray(stored[key], x.dtype))
    out.append(treedef.unflatten(new))
  return out[0], out[1]


class MetricsLog:
  """Per-epoch rows, appended to metrics.jsonl and metrics.csv (process 0 only).

  Resuming at epoch e keeps (and rewrites) the logged rows of epochs ≤ e.
  """

  def __init__(self, workdir: Optional[str], resume_epoch: int):
    self.workdir = workdir if jax.process_index() == 0 else None
    self.rows: list[dict] = []
    if self.workdir and os.path.exists(self._path("jsonl")):
      with open(self._path("jsonl")) as f:
        self.rows = [r for r in map(json.loads, f) if r["epoch"] <= resume_epoch]
      self._rewrite()

  def _path(self, ext):
    return os.path.join(self.workdir, f"metrics.{ext}")

  def _rewrite(self):
    with open(self._path("jsonl"), "w") as f:
      for r in self.rows:
        f.write(json.dumps(r) + "\n")
    keys = list(dict.fromkeys(k for r in self.rows for k in r))
    with open(self._path("csv"), "w", newline="") as f:
      w = csv.DictWriter(f, keys)
      w.writeheader()
      w.writerows(self.rows)

  def write(self, row: dict):
    """Appends one epoch's row."""
    self.rows.append(row)
    if self.workdir:
      self._rewrite()


def _flat_like(state: Any, tree: Any) -> dict[str, Any]:
  """``tree`` (params-structured, may hold static / ``None`` leaves) keyed by the
  params' paths, read from the SplitLBI ``state``."""
  flat = slbi.masks.params_structure(state).flatten_up_to(tree)
  return {path_str(p): v for p, v in zip(slbi.masks.params_paths(state), flat)}


def filter_norms(opt_state: Any, params: Any) -> dict[str, np.ndarray]:
  """Per-group norms ‖Γ_g‖ and ‖W_g‖ of every group-penalized leaf (Fig. 1 path).

  Returns:
    ``{"gamma/<leaf>": norms, "weight/<leaf>": norms}``.
  """
  state = slbi.find_state(opt_state)
  pens = _flat_like(state, state.penalty)
  norms = {kind: _flat_like(state, slbi.group_norms_tree(tree, state, keepdims=False))
           for kind, tree in (("gamma", slbi.gamma(state)), ("weight", params))}
  return {f"{kind}/{name}": np.asarray(norms[kind][name])
          for name, pe in pens.items() if pe is not None and pe.kind == "group"
          for kind in ("gamma", "weight")}


class NormsFile:
  """A recorder: appends each epoch's :func:`filter_norms` to ``norms.npz``
  (resuming at epoch e keeps the rows of epochs 0..e)."""

  def __init__(self, workdir: str, start_epoch: int):
    self.path = os.path.join(workdir, "norms.npz")
    self.rows: dict[str, list] = {}
    if start_epoch > 0 and os.path.exists(self.path):
      with np.load(self.path) as f:
        self.rows = {k: list(v[:start_epoch + 1]) for k, v in f.items()}

  def __call__(self, epoch: int, state: TrainState) -> None:
    del epoch
    for k, v in filter_norms(*distributed.fetch((state.opt_state, state.params))).items():
      self.rows.setdefault(k, []).append(v)
    if jax.process_index() == 0:
      save_npz(self.path, {k: np.stack(v) for k, v in self.rows.items()})


def params_snapshots(workdir: str, epochs: Sequence[int]) -> Recorder:
  """A recorder writing weights and BatchNorm statistics at ``epochs`` to
  ``snapshots/epoch_XXXX.npz`` (``init_from`` of a later run)."""

  def record(epoch: int, state: TrainState) -> None:
    if epoch in epochs:
      params, stats = distributed.fetch((state.params, state.batch_stats))
      arrays = {f"params/{k}": v for k, v in flat(params).items()}
      arrays.update({f"batch_stats/{k}": v for k, v in flat(stats).items()})
      if jax.process_index() == 0:
        save_npz(os.path.join(workdir, "snapshots", f"epoch_{epoch:04d}.npz"), arrays)

  return record


def support_snapshots(workdir: str, epochs: Sequence[int]) -> Recorder:
  """A recorder writing supp Γ at ``epochs`` to ``masks/epoch_XXXX.npz``
  (``mask_from`` of a later run)."""

  def record(epoch: int, state: TrainState) -> None:
    if epoch in epochs:
      sup = {k: v for k, v in flat(distributed.fetch(slbi.support(state.opt_state))).items()
             if v is not None}
      if jax.process_index() == 0:
        save_npz(os.path.join(workdir, "masks", f"epoch_{epoch:04d}.npz"), sup)

  return record


def checkpoint_manager(workdir: Optional[str], keep: int):
  """An orbax ``CheckpointManager`` on ``workdir/checkpoints`` (``None`` without a workdir)."""
  if not workdir:
    return None
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore(ckpt, state: TrainState) -> tuple[TrainState, int]:
  """The latest checkpoint, laid out like ``state``, and its epoch; else ``(state, 0)``."""
  if ckpt is None or ckpt.latest_step() is None:
    return state, 0
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  epoch = int(ckpt.latest_step())
  abstract = jax.tree.map(  # this run's layout, whatever the writer's was
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  return TrainState(*ckpt.restore(epoch, args=ocp.args.StandardRestore(abstract))), epoch


def save_checkpoint(ckpt, state: TrainState, epoch: int) -> None:
  """Saves ``state`` as ``epoch`` and waits (the next step donates its buffers)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckpt.save(epoch, args=ocp.args.StandardSave(state))
  ckpt.wait_until_finished()
