"""What each section measures, at each size: the CPU suite and the accelerator suite.

Modes: ``full`` and ``quick`` (CPU, for ``results/RESULTS.md``), ``device`` (one
GPU / TPU, for ``results/RESULTS_GPU.md``) and ``smoke`` (the device suite on
tiny shapes, in seconds on a CPU; CI runs it). A section function returns the
section's JSON; ``progress`` receives it after every finished unit, so a
section killed at its time limit still reports what it measured.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

from benchmarks import common, measure, shapes

MODES = ("full", "quick", "device", "smoke")
DEVICE_MODES = ("device", "smoke")

# The update alone: tree -> interleaved rounds.
UPDATE_TREES = {
    "full": {"LeNet-5": 40, "ResNet-20": 30, "ResNet-18": 9, "ResNet-50": 9, "VGG-16": 5},
    "quick": {"LeNet-5": 15, "ResNet-20": 10, "ResNet-50": 4},
    "device": {"ResNet-50": 15, "VGG-16": 15, "Transformer-1.3B": 9},
    "smoke": {"Transformer-tiny": 3}}
# Bytes of the copy kernel that measures the memory bandwidth next to the updates.
COPY_BYTES = {"full": 256 * 2**20, "quick": 64 * 2**20, "device": 2**30, "smoke": 2**22}
TIMING = {"full": common.CPU, "quick": common.CPU, "device": common.DEVICE,
          "smoke": common.DEVICE_SMOKE}

_LENET = ("lenet5", (28, 28, 1), 128, 10)
_RESNET20 = ("resnet20", (32, 32, 3), 128, 10)
_SLBI = ("sgd", "splitlbi")  # ResNet-20 steps take seconds on CPU: SplitLBI vs SGD only
# Full train steps (Table 6 of the paper on the device). On the device ResNet-18 runs
# first: when the budget runs short, ResNet-20 (small, cheap) is what is lost.
TRAIN_MODELS = {
    "full": {"LeNet-5": measure.TrainModel(*_LENET, rounds=40),
             "ResNet-20": measure.TrainModel(*_RESNET20, rounds=10, opts=_SLBI)},
    "quick": {"LeNet-5": measure.TrainModel(*_LENET, rounds=10),
              "ResNet-20": measure.TrainModel(*_RESNET20, rounds=3, opts=_SLBI)},
    "device": {"ResNet-18": measure.TrainModel("resnet18", (224, 224, 3), 256, 1000, 8),
               "ResNet-20": measure.TrainModel(*_RESNET20, rounds=12)},
    "smoke": {"DigitsCNN": measure.TrainModel("digits_cnn", (8, 8, 1), 8, 10, 3, _SLBI)}}

Progress = Callable[[dict], None]


def _ignore(_: dict) -> None:
  pass


def update(mode: str, deadline: float = measure.NEVER, progress: Progress = _ignore) -> dict:
  """The copy bandwidth, then every tree of :data:`UPDATE_TREES` (each its own unit)."""
  copy_bytes, timing = COPY_BYTES[mode], TIMING[mode]
  res = {"copy": measure.copy_bandwidth(copy_bytes, timing), "trees": {}, "skipped": [],
         "errors": {}}
  progress(res)
  for name, rounds in UPDATE_TREES[mode].items():
    if measure.past_deadline(deadline, 5.0):
      res["skipped"].append(name)
      continue
    try:
      r = measure.update(shapes.ARCHS[name](), rounds, copy_bytes, timing, deadline=deadline)
      res["trees"][name] = r
      print(f"[update] {name}: " + ", ".join(
          f"{n} {o['median'] * 1e3:.3f} ms ({o['x_bound']:.2f}x bound)"
          for n, o in r["opts"].items()), flush=True)
    except Exception:  # pylint: disable=broad-except
      res["errors"][name] = traceback.format_exc()[-3000:]
      print(f"[update] {name} failed:\n{res['errors'][name]}", flush=True)
    progress(res)
  return res


def train(mode: str, key: str, deadline: float = measure.NEVER) -> dict:
  """One model of :data:`TRAIN_MODELS`: compile and time its train steps."""
  r = measure.train_step(TRAIN_MODELS[mode][key], TIMING[mode], deadline)
  print(f"[train] {key}: " + ", ".join(
      f"{n} {o['median'] * 1e3:.2f} ms (x{o.get('ratio_vs_sgd') or float('nan'):.3f})"
      for n, o in r.get("opts", {}).items()), flush=True)
  return r


def train_all(mode: str, deadline: float = measure.NEVER) -> dict:
  """Every model of the mode's :data:`TRAIN_MODELS` in this process: {model: result}."""
  return {key: train(mode, key, deadline) for key in TRAIN_MODELS[mode]}


def train_memory(mode: str, key: str, opts: list[str], deadline: float = measure.NEVER
                 ) -> dict:
  """Peak device memory of the train steps ``opts`` of one model (see
  :func:`benchmarks.measure.train_memory`)."""
  r = measure.train_memory(TRAIN_MODELS[mode][key], opts, deadline)
  print(f"[memory] {key}: " + ", ".join(
      f"{n} peak {v.get('peak_bytes_in_use')} B" for n, v in r["memory"].items()), flush=True)
  return r
