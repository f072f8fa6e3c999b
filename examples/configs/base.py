"""The :class:`Config` dataclass shared by every run, and ``--set`` overrides."""

from __future__ import annotations

import ast
import dataclasses
import typing
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one training run needs (``python -m examples.train --set k=v``).

  Learning rates: for SplitLBI ``learning_rate`` is α and the weights move at
  κα (paper: κα = 0.1); for SGD / Adam it is the step size.
  """

  name: str = "digits"
  description: str = ""
  # data
  dataset: str = "digits"          # digits | idx:<dir> | mnist | fashion_mnist | cifar10 | imagenet2012
  data_dir: Optional[str] = None   # TFDS data_dir (or IDX directory for dataset="idx")
  image_size: Optional[int] = None  # resize / crop (ImageNet: 224)
  augment: bool = True
  train_examples: Optional[int] = None  # use only the first n training examples
  eval_examples: Optional[int] = None   # evaluate on the first n test examples
  # model
  model: str = "digits_cnn"
  model_kwargs: tuple = ()         # ((name, value), ...) extra module attributes
  # optimizer
  optimizer: str = "splitlbi"      # splitlbi | sgd | adam | adamw
  direction: str = "momentum"      # splitlbi's W direction: momentum (paper) | adam
  learning_rate: float = 0.1
  momentum: float = 0.9            # 0: the "Naive" variants
  nesterov: bool = False
  weight_decay: float = 0.0
  kappa: float = 1.0
  nu: float = 10.0
  lam: float = 1.0                 # λ of every penalized layer ...
  conv_lam: Optional[float] = None  # ... unless overridden for conv kernels
  fc_lam: Optional[float] = None    # ... or dense kernels
  penalty: str = "group"           # group: filters of conv + lasso on dense; lasso: lasso everywhere;
  #                                  channels: groups spanning layers (removable channels, conv_lam)
  group_members: str = "producers"  # channels: producers | consumers (also enter the norms)
  group_attached: bool = True      # channels: BatchNorm scale / shift join their channel's group
  normalized: bool = False         # group threshold λ·√d (official lottery code)
  coupling: str = "outside"
  # schedule: constant | step (×decay_factor every decay_every epochs) | multistep
  schedule: str = "step"
  decay_every: int = 30
  milestones: tuple = (80, 120)
  decay_factor: float = 0.1
  warmup_steps: int = 0            # linear warm-up of the rate over the first steps
  # loop
  epochs: int = 100
  batch_size: int = 128
  eval_batch_size: int = 500
  max_steps_per_epoch: Optional[int] = None
  num_devices: Optional[int] = None  # None: all devices (data parallel)
  param_sharding: str = "replicated"  # replicated (data parallel) | fsdp (kernels split too)
  seed: int = 0
  prng_impl: str = "rbg"           # PRNG of the weight init (threefry2x32: JAX's default)
  checkpoint_every: int = 1        # epochs between checkpoints (with a workdir)
  keep_checkpoints: int = 2
  record_norms: bool = True        # per-filter norms of Γ and W each epoch (Fig. 1)
  progress: bool = True            # tqdm bar (only on a terminal)
  # lottery / rewind (Fig. 5, App. D)
  save_masks_at: tuple = ()        # epochs whose supp Γ is written to <workdir>/masks/
  save_params_at: tuple = ()       # epochs whose weights go to <workdir>/snapshots/ (0: init)
  mask_from: Optional[str] = None  # train under this fixed mask (.npz from save_masks_at)
  init_from: Optional[str] = None  # start from these weights (.npz from save_params_at)
  retrain_slim: bool = False       # train the slim architecture of mask_from from scratch
  # physical slimming (docs/slimming.md)
  slim: bool = False               # at the end: remove pruned channels, report and evaluate

  def replace(self, **kw: Any) -> "Config":
    return dataclasses.replace(self, **kw)


def _parse_value(text: str, annotation: Any, current: Any, cls: type = None) -> Any:
  if text in ("None", "none", "null"):
    return None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  target = type(current) if current is not None else None
  if target is None:
    args = [a for a in typing.get_args(typing.get_type_hints(cls or Config).get(annotation, type(None)))]
    target = next((a for a in args if a is not type(None)), None)
  if target is bool and isinstance(value, str):
    if value.lower() in ("true", "yes", "1"):
      return True
    if value.lower() in ("false", "no", "0"):
      return False
  if target is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if target is tuple and isinstance(value, (list, int, float)):
    return tuple(value) if isinstance(value, list) else (value,)
  if target is str and not isinstance(value, str):
    return text
  return value


def apply_overrides(config: Any, overrides: list[str]) -> Any:
  """Applies ``["epochs=3", "nu=100", "optimizer=sgd"]`` to ``config`` (a
  :class:`Config` or another dataclass, e.g. ``examples.grow.Growth``).

  Raises:
    ValueError: for an unknown field or a malformed ``key=value``.
  """
  names = {f.name for f in dataclasses.fields(config)}
  changes = {}
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set expects key=value, got {item!r}.")
    key, text = item.split("=", 1)
    key = key.strip()
    if key not in names:
      raise ValueError(f"--set: unknown config field {key!r}; fields: {', '.join(sorted(names))}.")
    changes[key] = _parse_value(text.strip(), key, getattr(config, key), type(config))
  return dataclasses.replace(config, **changes)
