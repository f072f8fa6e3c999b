"""What every study shares: runs that resume, seeds, mean ± sd tables, timing.

A study is a list of :class:`Run`\\ s (one training run each, over seeds) and a
report that turns their results into a markdown table and PNG plots. Each run
writes ``<out>/runs/<key>/result.json`` when it finishes; a rerun of the study
loads that file instead of training again, so an interrupted study resumes
where it stopped (an unfinished run restarts from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import numpy as np

from examples.configs.base import Config

FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# A run's executor: (config, run_dir) -> result dict (JSON-serialisable).
Executor = Callable[[Config, str], dict]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a study.

  Attributes:
    key: unique name within the study, also its directory ``runs/<key>``.
    config: the run's config (paths to files of other runs are filled in by
      ``prepare``).
    prepare: ``(config, runs_dir) -> config`` called just before training, once
      the runs it reads from have finished (e.g. writes a mask file and points
      ``mask_from`` at it).
    execute: what trains it (default :func:`train_run`).
    keep_files: give the trainer a workdir (norms, masks, snapshots); else the
      run directory holds only ``result.json``.
  """

  key: str
  config: Config
  prepare: Optional[Callable[[Config, str], Config]] = None
  execute: Optional[Executor] = None
  keep_files: bool = False


def train_run(config: Config, run_dir: Optional[str]) -> dict:
  """Trains with :func:`examples.train.train_and_evaluate`; the per-epoch rows and
  the final per-layer densities (no checkpoints are kept afterwards)."""
  from examples import train
  # One checkpoint at the end at most (deleted below): a study resumes whole runs.
  config = config.replace(checkpoint_every=max(config.checkpoint_every, config.epochs))
  result = train.train_and_evaluate(config, run_dir, verbose=False)
  if run_dir:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  sparsity = result.get("sparsity") or {}
  return {"history": result["history"],
          "layer_density": {k: v["weight_density"]
                            for k, v in sparsity.get("layers", {}).items()},
          "layer_group_density": {k: v["group_density"]
                                  for k, v in sparsity.get("layers", {}).items()}}


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def run_study(runs: Sequence[Run], runs_dir: str, *, say: Callable[[str], None] = print) -> dict:
  """Runs every run not finished yet (in order); returns ``{key: result}``.

  Each result holds the executor's dict plus ``config``, ``wall_s``, ``cpu_s``
  (CPU seconds of this process, all threads) and ``load`` (the 1-minute load
  average before and after).
  """
  keys = [r.key for r in runs]
  if len(set(keys)) != len(keys):
    raise ValueError(f"run keys must be unique, got duplicates in {keys}.")
  results = {}
  for i, run in enumerate(runs):
    run_dir = os.path.join(runs_dir, run.key)
    path = os.path.join(run_dir, "result.json")
    if os.path.exists(path):
      with open(path) as f:
        results[run.key] = json.load(f)
      continue
    os.makedirs(run_dir, exist_ok=True)
    config = run.prepare(run.config, runs_dir) if run.prepare else run.config
    load0, wall0, cpu0 = os.getloadavg()[0], time.time(), time.process_time()
    out = (run.execute or train_run)(config, run_dir if run.keep_files else None)
    out = dict(out, key=run.key, config=dataclasses.asdict(config),
               wall_s=time.time() - wall0, cpu_s=time.process_time() - cpu0,
               load=[load0, os.getloadavg()[0]])
    out = _jsonable(out)
    with open(path + ".tmp", "w") as f:
      json.dump(out, f)
    os.replace(path + ".tmp", path)
    results[run.key] = out
    say(f"[{i + 1}/{len(runs)}] {run.key}: {summary_line(out)} "
        f"({out['wall_s']:.0f} s wall, {out['cpu_s']:.0f} s CPU, load {load0:.1f})")
  return results


def summary_line(result: dict) -> str:
  """``test 88.1%  sparse 85.0%  density 12.3%`` of a run's last epoch."""
  last = (result.get("history") or [{}])[-1]
  parts = [f"{k} {100 * last[m]:.1f}%" for k, m in
           (("test", "test_accuracy"), ("sparse", "sparse_test_accuracy"),
            ("density", "weight_density")) if last.get(m) is not None]
  return "  ".join(parts) or "done"


def seeds_of(n: int) -> tuple[int, ...]:
  return tuple(range(n))


def last(result: dict, metric: str) -> float:
  """``metric`` of the last epoch (NaN when absent or not finite)."""
  v = (result.get("history") or [{}])[-1].get(metric)
  return float("nan") if v is None else float(v)


def curve(result: dict, metric: str) -> np.ndarray:
  """``metric`` per epoch (NaN where absent)."""
  return np.array([np.nan if r.get(metric) is None else r[metric]
                   for r in result.get("history") or []], np.float64)


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
  """Mean, sample standard deviation (ddof 1; 0 for one value) and count."""
  v = np.asarray(list(values), np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt(values: Iterable[float], scale: float = 100.0, digits: int = 2) -> str:
  """``"89.12 ± 0.31"`` (mean ± sd over seeds, ×100 for accuracies by default)."""
  m, s, n = mean_sd(values)
  if n == 0 or not math.isfinite(m):
    return "–"
  return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table."""
  lines = ["| " + " | ".join(map(str, header)) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def timing(results: dict) -> dict:
  """Totals over a study's runs: wall and CPU seconds, load range, machine."""
  loads = [x for r in results.values() for x in r.get("load", [])]
  return {"runs": len(results),
          "wall_s": sum(r.get("wall_s", 0.0) for r in results.values()),
          "cpu_s": sum(r.get("cpu_s", 0.0) for r in results.values()),
          "load_min": min(loads, default=float("nan")),
          "load_max": max(loads, default=float("nan")),
          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"}


def timing_line(t: dict) -> str:
  return (f"{t['runs']} runs: {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} CPU-min "
          f"(1-min load average {t['load_min']:.1f}–{t['load_max']:.1f}; {t['machine']})")


def write_text(path: str, text: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path
