"""Physical slimming: parameters, FLOPs and CPU latency, dense vs slim.

``python -m benchmarks.slim [--quick] [--json F] [--search-steps N]``; in the suite:
``python -m benchmarks.run --only slim``.

For VGG-16-BN and ResNet-56 (CIFAR variants, full width, 32×32×3 inputs):

1. *Search*: a short SplitLBI run with the paper's lottery settings
   (``lottery/<net>/search``: conv filters group lasso with λ 0.1 (VGG-16) /
   0.05 (ResNet-56), thresholds λ·√d as in the official lottery code, ν 100,
   κ 1, α 0.1, Nesterov momentum 0.9, weight decay 1e-4, batch 64) for
   ``--search-steps`` steps on CIFAR-shaped data: Fashion-MNIST training images
   (Debian's ``dataset-fashion-mnist``) zero-padded to 32×32 and repeated over 3
   channels. Its conv-filter masks are cached in ``benchmarks/results/slim_masks.npz``
   (delete it to search again).
2. *Masks*: supp Γ at the end of the search (``group_support``), and
   ``prune_to_sparsity`` at 50 % and 25 % of the filters of every conv layer
   (``scope="layer"``, the entry order of the same run). Only conv filters are
   masked: the classifier's outputs are the logits, which are never removed.
3. *Measure*: ``slim_linen`` on each mask; parameters, FLOPs (XLA's cost
   analysis of the jitted forward pass at batch 256) and CPU inference latency
   at batch 256 of the jitted dense and slim modules, interleaved round-robin
   (medians). The goal: speed-up ≥ 0.8 × FLOP reduction.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax_splitlbi as sl
from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
MASKS_PATH = os.path.join(HERE, "results", "slim_masks.npz")
FASHION = "/usr/share/datasets/fashion-mnist"
NETS = ("vgg16", "resnet56")
FAMILIES = ("early", "supp", "p50", "p25")
ROUNDED = ("early_r8", "p50_r8", "p25_r8")  # the same masks with slim(..., round_to=8)
SWEEP = ((32, (64, 32, 16, 8, 4)), (16, (256, 128, 64, 32)), (2, (512, 256, 64)))  # (H = W, C)
CONV_LAM = 0.05  # ResNet-56: the paper's Table 10; VGG-16: the official script (paper: 0.1)
BATCH = 256


def cifar_shaped(n: int, seed: int = 0, data: str = FASHION) -> tuple[np.ndarray, np.ndarray]:
  """``n`` Fashion-MNIST training images as 32×32×3 (zero-padded, grey → RGB), labels."""
  from examples import input_pipeline  # pylint: disable=g-import-not-at-top
  images = input_pipeline.read_idx(os.path.join(data, "train-images-idx3-ubyte.gz"))
  labels = input_pipeline.read_idx(os.path.join(data, "train-labels-idx1-ubyte.gz"))
  rng = np.random.default_rng(seed)  # epochs of reshuffled images
  idx = np.concatenate([rng.permutation(len(images)) for _ in range(-(-n // len(images)))])[:n]
  x = (images[idx].astype(np.float32) / 255.0 - 0.286) / 0.353
  x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None].repeat(3, axis=-1)
  return x, labels[idx].astype(np.int32)


def search(net: str, steps: int, batch: int = 64, every: int = 100, log=print,
           data: str = FASHION) -> dict:
  """Trains ``lottery/<net>/search`` for ``steps`` steps; returns per-conv filter masks.

  Every ``every`` steps the filters in supp Γ are stored as ``supp@<step>:<layer>``;
  after a fifth of the steps its :func:`completed_support` as ``early:<layer>``,
  at the end the same as ``supp:<layer>`` and the ``prune_to_sparsity`` masks at
  50 % / 25 % per layer (``p50:<layer>``, ``p25:<layer>``).
  """
  from examples import configs, models, train, train_steps  # pylint: disable=g-import-not-at-top
  config = configs.get_config(f"lottery/{net}/search").replace(conv_lam=CONV_LAM)
  model = models.get_model(config.model, 10)
  tx = train.make_optimizer(config, steps_per_epoch=steps)
  x, y = cifar_shaped(steps * batch, data=data)
  variables = jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), x[:1], train=False))()
  state = train_steps.TrainState(variables["params"], variables["batch_stats"],
                           tx.init(variables["params"]))
  step = jax.jit(train_steps.make_train_step(model, tx), donate_argnums=(0,))
  out, t0 = {}, time.perf_counter()

  def store(prefix, masks):
    for path, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda m: m is None)[0]:
      if m is not None and m.ndim == 4:
        out[f"{prefix}:{jax.tree_util.keystr(path, simple=True, separator='/')}"] = (
            np.asarray(m).any((0, 1, 2)))

  for i in range(1, steps + 1):
    b = slice((i - 1) * batch, i * batch)
    state, metrics = step(state, {"image": x[b], "label": y[b]}, None)
    if i == max(1, steps // 5):
      store("early", completed_support(state))
      out["early_step"] = i
    if i % every == 0 or i == steps:
      store(f"supp@{i}", sl.group_support(state.opt_state))
      kept = [v for k, v in out.items() if k.startswith(f"supp@{i}:")]
      log(f"{net} step {i}: loss {float(metrics['loss']):.3f}, filters in supp Γ "
          f"{sum(v.sum() for v in kept)}/{sum(v.size for v in kept)}, empty layers "
          f"{sum(not v.any() for v in kept)} ({time.perf_counter() - t0:.0f} s)")
  out["search_seconds"] = time.perf_counter() - t0
  out["search_steps"], out["search_batch"] = steps, batch
  out["search_device"] = str(jax.devices()[0].device_kind)
  store("p50", sl.prune_to_sparsity(state.params, state.opt_state, 0.5, scope="layer"))
  store("p25", sl.prune_to_sparsity(state.params, state.opt_state, 0.25, scope="layer"))
  store("supp", completed_support(state))
  return out


def completed_support(state) -> dict:
  """supp Γ, plus the first filter to come (largest ‖V_g‖) in layers with none yet.

  ``prune_to_sparsity`` with each layer's supp Γ density, floored at one group:
  it keeps the entered groups and breaks ties by ‖V_g‖.
  """
  report = sl.sparsity_report(state.opt_state, state.params)
  target = {k: max(v["nonzero_groups"], 1) / v["groups"] for k, v in report["layers"].items()}
  return sl.prune_to_sparsity(state.params, state.opt_state, target, scope="layer")


def load_masks(net: str, family: str, params, path: str = MASKS_PATH) -> dict:
  """The cached filter masks of ``family`` in the keepdims layout (None elsewhere)."""
  with np.load(path) as f:
    stored = {k.split(":", 2)[2]: f[k] for k in f.files if k.startswith(f"{net}:{family}:")}

  def mask(path, p):
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    return stored[key].reshape(1, 1, 1, -1) if key in stored else None

  return jax.tree_util.tree_map_with_path(mask, params)


def couple(masks, groups: list, density: float):
  """One kept set per coupled group: the ``density`` of its channels most kernels keep.

  ``groups`` from :func:`optax_splitlbi.coupled_channels`; a group of several
  kernels (a residual stage) then removes every channel it drops.
  """
  masks = jax.tree.map(np.asarray, masks)

  def leaf(path):
    node = masks
    for k in path.split("/")[1:-1]:
      node = node[k]
    return node

  for group in (g for g in groups if len(g) > 1):
    vecs = [leaf(p)[p.rsplit("/", 1)[1]].reshape(-1) for p, _ in group]
    votes = np.sum(vecs, axis=0)
    keep = np.zeros(votes.size, bool)
    keep[np.argsort(-votes, kind="stable")[:max(1, round(density * votes.size))]] = True
    for p, _ in group:
      leaf(p)[p.rsplit("/", 1)[1]] = keep.reshape(1, 1, 1, -1)
  return masks


class Forward(common.Call):
  """A jitted forward pass (inference mode) timed by :func:`common.interleaved`."""

  def __init__(self, module, variables, x):
    super().__init__(jax.jit(lambda v, x: module.apply(v, x, train=False)), variables, x)


def _filters(masks) -> tuple[int, int]:
  leaves = [m for m in jax.tree.leaves(masks) if m is not None]
  return int(sum(m.sum() for m in leaves)), int(sum(m.size for m in leaves))


def measure(net: str, rounds: int, masks_path: str = MASKS_PATH) -> dict:
  """Slims ``net`` at every cached mask family; FLOPs and interleaved latencies."""
  from examples import models  # pylint: disable=g-import-not-at-top
  model = models.get_model(net, 10)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, 32, 32, 3)), jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), x[:1], train=False))()
  out, fwd = {}, {"dense": Forward(model, variables, x)}
  apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  groups = sl.coupled_channels(apply, variables, x[:2])
  coupled = any(len(g) > 1 for g in groups)
  families = FAMILIES + (("p50c", "p25c") if coupled else ()) + ROUNDED
  for family in families:
    base = family.removesuffix("_r8")
    masks = load_masks(net, base.rstrip("c"), variables["params"], masks_path)
    if base.endswith("c"):
      masks = couple(masks, groups, int(family[1:3]) / 100)
    res = sl.slim_linen(model, variables, masks, x, train=False,
                        round_to=8 if family.endswith("_r8") else 1)
    kept, total = _filters(masks)
    r = res.report
    out[family] = dict(filter_density=kept / total, params_dense=r["params"]["dense"],
                       params_slim=r["params"]["slim"], flops_dense=r["flops"]["dense"],
                       flops_slim=r["flops"]["slim"], bytes_dense=r["flops"]["bytes_dense"],
                       bytes_slim=r["flops"]["bytes_slim"],
                       inexact_folds=sum(not f["exact"] for f in r["folds"]),
                       max_abs_diff=r["max_abs_diff"], max_abs_output=r["max_abs_output"],
                       widths_removed=sum(v["removed"] for v in r["layers"].values()),
                       kept_by_coupling=sum(v["kept_pruned"] for v in r["layers"].values()))
    fwd[family] = Forward(res.module, res.variables, x)
  times = common.interleaved(fwd, rounds=rounds, warmup=1)
  out["latency"] = {k: common.stats(v) for k, v in times.items()}
  dense = out["latency"]["dense"]["median"]
  for family in families:
    o = out[family]
    o["speedup"] = dense / out["latency"][family]["median"]
    o["flop_reduction"] = o["flops_dense"] / o["flops_slim"]
    o["bytes_reduction"] = o["bytes_dense"] / o["bytes_slim"]
    o["goal_met"] = o["speedup"] >= 0.8 * o["flop_reduction"]
  return out


def _conv(c: int, hw: int, batch: int) -> tuple[common.Call, float]:
  """A jitted 3×3 SAME conv (C → C channels) on a fixed batch, and its FLOPs."""
  rng = np.random.default_rng(c)
  x = jnp.asarray(rng.normal(size=(batch, hw, hw, c)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, c, c)), jnp.float32)
  fn = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  compiled = jax.jit(fn).lower(x, k).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  return common.Call(compiled, x, k), flops


def conv_efficiency(channels=(64, 63, 60, 56, 48, 40, 33, 32), hw: int = 16,
                    batch: int = BATCH, rounds: int = 15) -> dict:
  """GFLOP/s of XLA:CPU's 3×3 conv by channel count (interleaved medians)."""
  convs = {str(c): _conv(c, hw, batch) for c in channels}
  times = common.interleaved({c: call for c, (call, _) in convs.items()}, rounds=rounds,
                             warmup=1)
  return {c: dict(flops=flops, median=common.stats(times[c])["median"],
                  gflops_per_s=flops / common.stats(times[c])["median"] / 1e9)
          for c, (_, flops) in convs.items()}


def _raw_support(f, net: str) -> dict:
  """Filter density and empty layers of the last stored supp Γ (before completion)."""
  last = max(int(k.split(":")[1][5:]) for k in f.files if k.startswith(f"{net}:supp@"))
  kept = [f[k] for k in f.files if k.startswith(f"{net}:supp@{last}:")]
  return dict(step=last, filter_density=sum(m.sum() for m in kept) / sum(m.size for m in kept),
              empty_layers=sum(not m.any() for m in kept), layers=len(kept))


def search_all(masks_path: str, steps: int, batch: int, data: str = FASHION) -> None:
  """Runs :func:`search` for every net and caches the masks in ``masks_path``."""
  cached = {}
  for net in NETS:
    for k, v in search(net, steps, batch, data=data).items():
      cached[f"{net}:{k}"] = v
    np.savez(masks_path, **cached)  # after each net: a killed run keeps the first


def run(quick: bool, search_steps: int = 900, search_batch: int = 64,
        masks_path: str = MASKS_PATH) -> dict:
  """Search (unless ``masks_path`` exists) and measure both networks."""
  res = {"batch": BATCH, "loadavg_start": os.getloadavg()}
  if not os.path.exists(masks_path):
    search_all(masks_path, search_steps, search_batch)
  with np.load(masks_path) as f:
    res["early_step"] = {n: int(f[f"{n}:early_step"]) for n in NETS}
    res["search"] = {n: {k: f[f"{n}:search_{k}"].item() for k in ("seconds", "steps", "batch",
                                                                   "device")} for n in NETS}
    res["raw_support"] = {n: _raw_support(f, n) for n in NETS}
  for net in NETS:
    res[net] = measure(net, 5 if quick else 15, masks_path)
  res["conv_efficiency"] = {str(hw): conv_efficiency(chans, hw=hw, rounds=5 if quick else 9)
                            for hw, chans in SWEEP}
  res["loadavg_end"] = os.getloadavg()
  return res


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="5 timing rounds instead of 15")
  ap.add_argument("--json", default=None, help="write the results here")
  ap.add_argument("--search-steps", type=int, default=900)
  ap.add_argument("--search-batch", type=int, default=64)
  ap.add_argument("--masks", default=MASKS_PATH, help="cached search masks (.npz)")
  ap.add_argument("--search-only", action="store_true",
                  help="only search (e.g. on an accelerator) and write --masks")
  ap.add_argument("--data", default=FASHION, help="Fashion-MNIST IDX directory")
  a = ap.parse_args()
  if a.search_only:
    search_all(a.masks, a.search_steps, a.search_batch, a.data)
    return
  res = run(a.quick, a.search_steps, a.search_batch, a.masks)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1, default=float)
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  print("\n".join(report.slim_section(res)))


if __name__ == "__main__":
  main()
