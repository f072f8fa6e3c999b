"""The markdown of a run (``RESULTS.md`` on CPU, ``RESULTS_GPU.md`` on a device) and the
closing summary of a device run; one set of tables for both."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence

MIB = 2**20
DEVICE_MODES = ("device", "smoke")


def ms(x: float | None) -> str:
  """Milliseconds with 3 significant-ish digits."""
  if x is None:
    return "n/a"
  return f"{x * 1e3:.3f}" if x < 0.01 else f"{x * 1e3:.2f}" if x < 1 else f"{x * 1e3:.0f}"


def num(x: float | None, fmt: str = ".2f") -> str:
  return "n/a" if x is None else format(x, fmt)


def mib(x: float | None) -> str:
  return "n/a" if x is None else f"{x / MIB:,.0f}" if x >= 10 * MIB else f"{x / MIB:.2f}"


def markdown_name(json_path: str) -> str:
  """``results_gpu.json`` -> ``RESULTS_GPU.md``, ``results.json`` -> ``RESULTS.md``."""
  stem = os.path.splitext(os.path.basename(json_path))[0]
  return "RESULTS" + stem[len("results"):].replace("_gpu", "_GPU") + ".md"


def result(res: dict, name: str) -> dict | None:
  """The result of section ``name`` if it produced one."""
  return (res["sections"].get(name) or {}).get("result")


def info(res: dict) -> dict:
  """Machine info: the driver's (CPU runs) or the first section's that reported it."""
  if res.get("machine"):
    return res["machine"]
  for sec in res["sections"].values():
    if isinstance(sec, dict) and sec.get("info"):
      return sec["info"]
  return {}


def trains(res: dict) -> Iterator[tuple[str, dict]]:
  """(model, train result) of every train section (one per model on a device)."""
  for name, sec in res["sections"].items():
    if name == "train":
      yield from (sec.get("result") or {}).items()
    elif name.startswith("train "):
      yield name[len("train "):], sec.get("result") or {}


# ----------------------------------------------------------------------------- tables


def update_table(trees: dict) -> list[str]:
  """One row per tree and optimizer, then the copy bandwidth next to each tree."""
  L = ["| tree | params | leaves | optimizer | median ms | IQR ms | calls/sample | MB moved | "
       "GB/s | BW frac | × bound | ÷ SGD | compile s |",
       "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  notes = []
  for tree, r in trees.items():
    for name, o in r["opts"].items():
      L.append(f"| {tree} | {r['params']:,} | {r['leaves']} | {name} | {ms(o['median'])} | "
               f"{ms(o['iqr'])} | {o['calls_per_sample']} | {o['bytes'] / 1e6:,.1f} | "
               f"{o['achieved_bandwidth'] / 1e9:,.1f} | {o['fraction_of_copy_bandwidth']:.2f} | "
               f"{o['x_bound']:.2f} | {num(o.get('ratio_vs_sgd'))} | {o['compile_s']:.1f} |")
    copy = next(iter(r["opts"].values()), {})
    notes.append(f"- {tree}: copy bandwidth {copy.get('copy_bandwidth', 0) / 1e9:.1f} GB/s "
                 f"(IQR {ms(copy.get('copy', {}).get('iqr'))} ms on "
                 f"{ms(copy.get('copy', {}).get('median'))} ms), interleaved {r['interleaved']}"
                 + (f"; skipped (budget): {', '.join(r['skipped'])}" if r.get("skipped") else ""))
  return L + [""] + notes + [""]


def _train_row(key: str, r: dict, name: str, with_peak: bool) -> str:
  t, c = r.get("opts", {}).get(name, {}), r["compile"][name]
  pr = t.get("paired_ratio")
  paired = f"{pr['median']:.3f} ({pr['q1']:.3f}-{pr['q3']:.3f})" if pr else "n/a"
  row = (f"| {key} | {r['batch']} | {name} | {ms(t.get('median'))} | {ms(t.get('iqr'))} | "
         f"{num(t.get('ratio_vs_sgd'), '.3f')} | {paired} | {mib(c.get('state_bytes'))} | "
         f"{mib((c.get('memory_analysis') or {}).get('temp_size_in_bytes'))} | "
         f"{c['compile_s']:.1f} |")
  if with_peak:
    mem = r.get("memory", {})
    m, sgd_peak = mem.get(name, {}), mem.get("sgd", {}).get("peak_bytes_in_use")
    peak = m.get("peak_bytes_in_use")
    delta = peak - sgd_peak if peak is not None and sgd_peak is not None else None
    row += (f" {'' if m.get('peak_rose', True) else '≤ '}{mib(peak)} | {mib(delta)} | "
            f"{num(m.get('load_s'), '.1f')} |")
  return row


def train_table(models: Sequence[tuple[str, dict]]) -> list[str]:
  """One row per model and optimizer; peak device memory columns where measured."""
  with_peak = any(r.get("memory") for _, r in models)
  L = ["| model | batch | optimizer | median ms | IQR ms | ÷ SGD | ÷ SGD (paired, IQR) | "
       "opt. state MiB | XLA temp MiB | compile s |" + (" peak MiB | peak − SGD MiB | load s |"
                                                        if with_peak else ""),
       "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 3 if with_peak else "")]
  for key, r in models:
    L.extend(_train_row(key, r, name, with_peak) for name in r.get("compile", {}))
  return L + [""]


# ----------------------------------------------------------------------------- problems


def _result_problems(name: str, r: dict) -> list[str]:
  out = [f"- {name}: {item} skipped (budget)" for item in r.get("skipped", [])]
  for tree, t in r.get("trees", {}).items():
    out.extend(f"- {name} {tree}: {o} skipped (budget)" for o in t.get("skipped", []))
    out.extend(f"- {name} {tree} {o}: error `{e.strip().splitlines()[-1]}`"
               for o, e in t.get("errors", {}).items())
  out.extend(f"- {name} {tree}: error `{e.strip().splitlines()[-1]}`"
             for tree, e in r.get("errors", {}).items())
  out.extend(f"- {name}: peak memory of {o} skipped (budget)"
             for o in r.get("memory_skipped", []))
  for o, m in r.get("memory", {}).items():
    if m.get("load_s", 0) > 0.5 * r.get("compile", {}).get(o, {}).get("compile_s", 1e9):
      out.append(f"- {name}: {o}: the memory process missed the compilation cache (load s "
                 "≈ compile s); its peak may include autotuning scratch")
  return out


def problems(res: dict) -> list[str]:
  """Every section that did not finish, everything skipped, every error."""
  out = []
  for name, sec in res["sections"].items():
    if sec.get("status") != "ok":
      last = [x for x in (sec.get("log_tail") or "").splitlines() if x.strip()][-1:]
      out.append(f"- {name}: {sec.get('status')}" + (f": `{last[0].strip()[:300]}`" if last else ""))
    r = sec.get("result")
    if isinstance(r, dict) and name not in ("train", "fused", "cross_leaf", "slim", "memory"):
      out.extend(_result_problems(name, r))
    mem_run = sec.get("memory_run") or {"status": "ok"}
    if mem_run.get("status") != "ok":
      out.append(f"- {name}: memory process {mem_run.get('status')}")
    for err in (mem_run.get("error"), sec.get("error")):
      if isinstance(err, str) and err.strip():
        out.append(f"- {name}: error `{err.strip().splitlines()[-1]}`")
  return out


def safely(render_fn: Callable[[dict], str], res: dict) -> str:
  """``render_fn(res)``, or the error and the raw JSON if it fails (never lose a run)."""
  try:
    return render_fn(res)
  except Exception:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    return (f"Rendering failed:\n```\n{traceback.format_exc()}```\n\n```json\n"
            f"{json.dumps(res, indent=1, default=str)[:200000]}\n```\n")


# ----------------------------------------------------------------------------- CPU sections


def _machine_section(res: dict) -> list[str]:
  """Title, how the file was generated, and the machine it ran on."""
  m = res["machine"]
  L = ["# optax_splitlbi benchmarks\n",
       f"Generated by `{res['command']}` on {res['date']} in {res.get('total_s', 0):.0f} s. "
       f"Raw numbers: `results{'_quick' if res['mode'] == 'quick' else ''}.json`.\n",
       "## Machine\n",
       f"- CPU: {m['cpu']}, {m['cores']} cores visible, "
       f"{(m['memory_bytes'] or 0) / 2**30:.1f} GiB RAM; JAX backend `{m['platform']}` "
       f"({m['device_kind']}); no GPU/TPU was available for these runs.",
       f"- Python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, optax {m['optax']}, "
       f"flax {m['flax']}, numpy {m['numpy']}."]
  if m.get("loadavg"):
    end = res.get("loadavg_end") or [float("nan")] * 3
    L.append(f"- Load average (1/5/15 min) at the start: {', '.join(f'{x:.1f}' for x in m['loadavg'])}; "
             f"at the end: {', '.join(f'{x:.1f}' for x in end)} (2 cores).")
  L.append("- **Shared, noisy machine**: the 2 cores were used at the same time by other "
           "processes (other engineers' test suites and training runs), and the VM stalls for "
           "0.3-0.8 s now and then. Absolute times therefore vary between runs by up to 2-4×; "
           "every comparison below is made *within one run*, candidates interleaved round-robin "
           "in shuffled order, and reported as medians, interquartile ranges (IQR) and ratios "
           "of medians. Trust the ratios more than the absolute milliseconds.\n")
  return L


UPDATE_INTRO = (
    "Bytes = compulsory traffic of a fused update (`benchmarks/optimizers.py`: SGD-momentum "
    "reads W, g, b and writes W, b; SplitLBI also reads and writes V and Γ on penalized "
    "leaves; lean SplitLBI only V; AdamW μ, ν; `splitlbi_adam`: SplitLBI with "
    "`direction=optax.scale_by_adam()`, μ, ν, V and Γ). *Copy BW* = a donated jitted `x + 1` over a "
    "large array (read + write bytes), timed interleaved with each tree. *× bound* = median "
    "time ÷ (bytes ÷ copy BW); *BW frac* = its inverse, the achieved fraction of copy "
    "bandwidth. One sample = *calls/sample* chained calls, then one `block_until_ready`; "
    "medians over interleaved rounds.\n")


def _update_section(u: dict) -> list[str]:
  return (["## Update only (jitted `update` + `apply_updates`, params and state donated, f32)\n",
           UPDATE_INTRO] + update_table(u["trees"]))


def _train_section(train: dict) -> list[str]:
  return ["## Full train step (forward + backward + update), batch 128\n",
          "Models from `examples/models.py` (LeNet-5 on 28×28×1, ResNet-20 on 32×32×3 with "
          "BatchNorm), softmax cross-entropy, params / batch stats / optimizer state donated. "
          "*paired* = median over rounds of (time ÷ SGD time in the same round).\n",
          *train_table(list(train.items()))]


def _memory_section(memory: dict) -> list[str]:
  """State sizes, XLA buffer sizes and peak RSS."""
  L = ["## Memory\n",
       "*state/param* = optimizer-state bytes ÷ parameter bytes, counted exactly from the "
       "state tree (all leaves; count included); *penalized* = the same over penalized "
       "leaves only (where SplitLBI keeps b, V and Γ; unpenalized leaves keep only b). "
       "*XLA temp / args* = buffer sizes from the compiled step's `memory_analysis()`. "
       "*Peak RSS* = process peak resident memory (each configuration in a fresh process), "
       "shown above the same process's peak after JAX start-up; on CPU it includes the "
       "compiler's own memory. Device memory: see `RESULTS_GPU.md`. "
       "Modes: `default`; `lean` = `store_gamma=False`; `bf16` = bf16 params with "
       "`state_dtype=jnp.float32` (ratios are per *bf16* parameter byte); `adamw`; "
       "`adam` = `direction=optax.scale_by_adam()` (no b: V, Γ and Adam's μ, ν; "
       "*penalized* counts V and Γ only).\n",
       "| step | mode | state/param | penalized state/param | XLA args MiB | XLA temp MiB | "
       "peak RSS − start-up MiB | peak RSS MiB | compile s |",
       "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for key, modes in memory.items():
    for mode, r in modes.items():
      if "error" in r:
        L.append(f"| {key} | {mode} | error | | | | | | |")
        continue
      ma, pen = r.get("memory_analysis") or {}, r.get("penalized_state_per_param_byte")
      L.append(f"| {key} | {mode} | {r['state_per_param_byte']:.3f} | {num(pen, '.3f')} | "
               f"{ma.get('argument_size_in_bytes', 0) / MIB:.1f} | "
               f"{ma.get('temp_size_in_bytes', 0) / MIB:.1f} | "
               f"{r['peak_rss_above_startup'] / MIB:.1f} | {r['peak_rss_bytes'] / MIB:.1f} | "
               f"{r['compile_s']:.1f} |")
  return L + [""]


def _scaling_rows(rows: list[dict], columns: Sequence[str]) -> list[str]:
  cell = {"key": lambda r: str(r["key"]), "params": lambda r: f"{r['params']:,}",
          "opt": lambda r: r["opt"], "median": lambda r: ms(r["median"]),
          "iqr": lambda r: ms(r["iqr"]), "per_leaf_us": lambda r: f"{r['per_leaf_us']:.1f}",
          "x_bound": lambda r: f"{r['x_bound']:.2f}", "compile_s": lambda r: f"{r['compile_s']:.2f}"}
  return ["| " + " | ".join(cell[c](r) for c in columns) + " |" for r in rows]


def _scaling_section(s: dict) -> list[str]:
  """Compile time, and update time against the number of leaves and parameters."""
  opts = list(next(iter(s["compile_s"].values())))
  L = ["## Compile time of the update step (lower + compile, s)\n",
       "| tree | " + " | ".join(opts) + " |", "|---|" + "---:|" * len(opts)]
  L += [f"| {arch} | " + " | ".join(f"{d[o]:.2f}" for o in opts) + " |"
        for arch, d in s["compile_s"].items()]
  L += ["", "## Update time vs number of leaves (L kernels of shape 3×3×16×16)\n",
        "| L | params | optimizer | median ms | µs per leaf | × bound | compile s |",
        "|---:|---:|---|---:|---:|---:|---:|"]
  L += _scaling_rows(s["leaves"]["rows"], ("key", "params", "opt", "median", "per_leaf_us",
                                           "x_bound", "compile_s"))
  L += ["", "## Update time vs parameter count (2 kernels of shape 3×3×C×C)\n",
        "| C | params | optimizer | median ms | IQR ms | × bound |", "|---:|---:|---|---:|---:|---:|"]
  L += _scaling_rows(s["params"]["rows"], ("key", "params", "opt", "median", "iqr", "x_bound"))
  L.append(f"\nCopy bandwidth in these runs: leaves {s['leaves']['copy_bandwidth'] / 1e9:.1f} GB/s, "
           f"params {s['params']['copy_bandwidth'] / 1e9:.1f} GB/s.\n")
  return L


def _fused_section(f: dict) -> list[str]:
  """The update and train-step tables again, with multi-output fusion on."""
  return ["## With XLA:CPU multi-output fusion\n",
          f"The same update and train-step benchmarks in a fresh process with "
          f"`XLA_FLAGS={f['flag']}` (off by default in XLA:CPU). With it, "
          "`splitlbi` picks its fusion-friendly CPU form and each penalized leaf's ΔW, b', V' "
          "(and Γ' for lasso leaves) become one kernel that reads W, g, b, V, Γ once "
          "(`tests/test_fusion.py` checks the compiled structure).\n",
          *update_table(f["update"]["trees"]), *train_table(list(f["train"].items()))]


def _cross_leaf_section(c: dict) -> list[str]:
  """Update time with groups that span layers ÷ per-leaf groups (benchmarks/cross_leaf.py)."""
  d = c["default"]
  L = ["## Groups that span layers: update time (ResNet-50, Flax example model)\n",
       f"SplitLBI with `channel_groups` ({d['classes']} classes: every residual channel's "
       f"filters with their BatchNorm scales and shifts, one norm per group) against its "
       f"default per-leaf penalty, {d['leaves']} leaves, {d['params'] / 1e6:.1f} M params; "
       "interleaved medians (ms) of the donated, jitted update + apply_updates.\n",
       "| XLA flags | per-leaf | cross-leaf | ratio | per-leaf lean | cross-leaf lean | ratio |",
       "|---|---:|---:|---:|---:|---:|---:|"]
  for label, r in (("default", c["default"]), ("multi-output fusion", c["fused"])):
    if r:
      o = r["opts"]
      L.append(f"| {label} | {ms(o['per_leaf']['median'])} | {ms(o['cross_leaf']['median'])} | "
               f"{r['ratio']:.3f} | {ms(o['per_leaf_lean']['median'])} | "
               f"{ms(o['cross_leaf_lean']['median'])} | {r['ratio_lean']:.3f} |")
  return L + [""]


SLIM_MASKS = {"early": "supp Γ at step {step}", "supp": "supp Γ at step {end}",
              "p50": "50 % / layer", "p25": "25 % / layer", "p50c": "50 % / coupled group",
              "p25c": "25 % / coupled group", "early_r8": "supp Γ at step {step}, round_to=8",
              "p50_r8": "50 % / layer, round_to=8", "p25_r8": "25 % / layer, round_to=8"}


def _slim_intro(res: dict, nets: Sequence[str]) -> list[str]:
  from benchmarks.slim import CONV_LAM  # pylint: disable=import-outside-toplevel
  raw, search = res["raw_support"], res["search"]
  return [
      "## Physical slimming (`python -m benchmarks.slim`)\n",
      "VGG-16-BN and ResNet-56 (CIFAR variants, full width, 32×32×3), slimmed by "
      "`slim_linen` at three conv-filter masks of one SplitLBI run with the lottery settings "
      f"(conv λ {CONV_LAM} with thresholds λ·√d, ν 100, κ 1, α 0.1, Nesterov, wd 1e-4) on "
      "Fashion-MNIST training images padded to 32×32×3 (search: "
      + ", ".join(f"{n} {search[n]['steps']} steps of batch {search[n]['batch']} "
                  f"in {search[n]['seconds']:.0f} s on {search[n]['device']}" for n in nets) + "):",
      "- *supp Γ*: the filters in supp Γ at the end of the run (" + ", ".join(
          f"{n}: {raw[n]['filter_density']:.1%} of the filters, {raw[n]['empty_layers']} of "
          f"{raw[n]['layers']} layers without any" for n in nets)
      + "); a layer without any keeps the one filter with the largest ‖V_g‖ (the next to "
      "enter), so that no plain conv stack is cut in two;",
      "- *50 % / 25 %*: `prune_to_sparsity(scope=\"layer\")` of the same run (entry order, "
      "then ‖V_g‖).\n",
      f"FLOPs: XLA cost analysis of the jitted forward pass at batch {res['batch']}. Latency: "
      f"CPU, batch {res['batch']}, the jitted dense and slim modules interleaved round-robin "
      f"(medians, IQR). Load average {res['loadavg_start'][0]:.1f} at the start, "
      f"{res['loadavg_end'][0]:.1f} at the end (2 cores). *kept by coupling*: pruned filters "
      "that stay because a coupled layer (a residual stage) keeps the channel (in the "
      "`round_to=8` rows also those kept back to round the widths up to multiples of 8).\n"]


def slim_section(res: dict) -> list[str]:
  """Parameters, FLOPs and latency, dense → slim, per network and mask."""
  nets = [n for n in ("vgg16", "resnet56") if n in res]
  L = _slim_intro(res, nets) + [
      "| net | mask | filters kept | kept by coupling | params dense → slim | GFLOPs dense → "
      "slim | FLOP ÷ | bytes ÷ | latency ms dense → slim (IQR) | speed-up | ≥ 0.8 × FLOP ÷ |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for net in nets:
    r, lat = res[net], res[net]["latency"]
    dense = f"{lat['dense']['median'] * 1e3:.0f} ({lat['dense']['iqr'] * 1e3:.0f})"
    for fam, label in ((f, l) for f, l in SLIM_MASKS.items() if f in r):
      o = r[fam]
      label = label.format(step=res["early_step"][net], end=res["search"][net]["steps"])
      L.append(f"| {net} | {label} | {o['filter_density']:.1%} | {o['kept_by_coupling']} | "
               f"{o['params_dense']:,} → {o['params_slim']:,} | {o['flops_dense'] / 1e9:.2f} → "
               f"{o['flops_slim'] / 1e9:.2f} | {o['flop_reduction']:.2f} | "
               f"{o['bytes_reduction']:.2f} | {dense} → {lat[fam]['median'] * 1e3:.0f} "
               f"({lat[fam]['iqr'] * 1e3:.0f}) | {o['speedup']:.2f} | "
               f"{'yes' if o['goal_met'] else 'no'} |")
  L += ["", "XLA:CPU throughput of one 3×3 SAME conv (C → C channels, batch "
        f"{res['batch']}; GFLOP/s from the cost analysis and the median time):\n"]
  for hw, r in res["conv_efficiency"].items():
    L.append(f"- {hw}×{hw}: " + ", ".join(f"C={c} {v['gflops_per_s']:.0f} GFLOP/s "
                                          f"({v['median'] * 1e3:.1f} ms)" for c, v in r.items()))
  return L + [""]


def _met(ok: bool) -> str:
  return "met" if ok else "not met"


def _update_targets(res: dict) -> list[str]:
  out = []
  up = ((result(res, "update") or {}).get("trees") or {}).get("ResNet-50")
  if up:
    o = up["opts"]
    out.append(f"- Update within 1.25× of its bandwidth bound on the ResNet-50 tree: "
               f"**{o['splitlbi']['x_bound']:.2f}×** ({_met(o['splitlbi']['x_bound'] <= 1.25)}; "
               f"SGD-momentum itself is at {o['sgd']['x_bound']:.2f}×, AdamW at "
               f"{o['adamw']['x_bound']:.2f}×).")
    if "splitlbi_adam" in o:
      x = o["splitlbi_adam"]["median"] / o["adamw"]["median"]
      out.append(f"- ResNet-50 update with the Adam direction ÷ AdamW: **{x:.2f}** "
                 f"({o['splitlbi_adam']['bytes'] / o['adamw']['bytes']:.2f} by bytes; "
                 f"{o['splitlbi_adam']['x_bound']:.2f}× its bandwidth bound).")
  fu = (((result(res, "fused") or {}).get("update") or {}).get("trees") or {}).get("ResNet-50")
  if fu:
    o = fu["opts"]
    out.append(f"- The same with XLA:CPU multi-output fusion on: **{o['splitlbi']['x_bound']:.2f}×** "
               f"({_met(o['splitlbi']['x_bound'] <= 1.25)}; lean "
               f"{o['splitlbi_lean']['x_bound']:.2f}×, SGD-momentum {o['sgd']['x_bound']:.2f}×, "
               f"SplitLBI ÷ SGD {o['splitlbi']['ratio_vs_sgd']:.2f}).")
  for label, limit, tree in (("XLA defaults", 1.6, up), ("with the fusion flag", 1.25, fu)):
    if tree:
      o = tree["opts"]
      x = o["splitlbi"]["ratio_vs_sgd"] / (o["splitlbi"]["bytes"] / o["sgd"]["bytes"])
      out.append(f"- ResNet-50 update ÷ SGD-momentum, scaled by bytes, {label}: **{x:.2f}** "
                 f"(≤ {limit}: {_met(x <= limit)}).")
  for label, key in (("CPU default", "default"), ("CPU fusion flag", "fused")):
    r = (result(res, "cross_leaf") or {}).get(key)
    if r:
      out.append(f"- Cross-leaf ÷ per-leaf update time on ResNet-50, {label}: **{r['ratio']:.3f}** "
                 f"(lean {r['ratio_lean']:.3f}; ≤ 1.1: "
                 f"{_met(max(r['ratio'], r['ratio_lean']) <= 1.1)}).")
  return out


def targets(res: dict) -> list[str]:
  """The project's targets, each with the figure that meets it or not."""
  out = _update_targets(res)
  tr = (result(res, "train") or {}).get("ResNet-20")
  if tr and "opts" in tr:
    o = tr["opts"]["splitlbi"]
    out.append(f"- Train-step overhead over SGD-momentum on ResNet-20 ≤ 3%: ratio of medians "
               f"**{o['ratio_vs_sgd']:.3f}**, paired {o['paired_ratio']['median']:.3f} "
               f"({_met(o['paired_ratio']['median'] <= 1.03)}).")
  for key, modes in (result(res, "memory") or {}).items():
    d, l = modes.get("default", {}), modes.get("lean", {})
    if "penalized_state_per_param_byte" in d:
      out.append(f"- State on penalized leaves ({key}): default **{d['penalized_state_per_param_byte']:.3f}×**, "
                 f"lean **{l.get('penalized_state_per_param_byte', float('nan')):.3f}×** the parameter "
                 f"bytes; whole tree (unpenalized leaves keep only momentum): "
                 f"{d['state_per_param_byte']:.3f}× / {l.get('state_per_param_byte', float('nan')):.3f}×.")
  return out


CPU_SECTIONS = {"update": _update_section, "train": _train_section, "memory": _memory_section,
                "scaling": _scaling_section, "fused": _fused_section,
                "cross_leaf": _cross_leaf_section, "slim": slim_section}


def render_cpu(res: dict, head: Sequence[str] = ()) -> list[str]:
  """RESULTS.md: the machine, one part per section that ran, targets, problems, notes."""
  L = _machine_section(res) + list(head)
  for name, section in CPU_SECTIONS.items():
    if result(res, name):
      L.extend(section(result(res, name)))
      rerun = res["sections"][name].get("rerun")  # a section measured again later, alone
      L.extend([f"*{rerun}*", ""] if rerun else [])
  L += ["## Targets\n", *targets(res), ""]
  problems_found = problems(res)
  if problems_found:
    L += ["## Skipped or failed\n", *problems_found, ""]
  if res.get("notes"):
    L += ["## Notes\n", res["notes"]]
  return L


# ----------------------------------------------------------------------------- device


def _device_lines(res: dict) -> list[str]:
  i, host = info(res), res["host"]
  smi = host.get("nvidia_smi") or {}
  limit = i.get("bytes_limit")
  return [
      "## Device\n",
      f"- JAX backend `{i.get('platform', 'n/a')}`, device `{i.get('device_kind', 'n/a')}`"
      f" ({len(i.get('devices', []))} visible); JAX allocator limit "
      f"{num(limit and limit / 2**30, '.1f')} GiB.",
      f"- nvidia-smi: {'; '.join(smi.get('gpus', [])) or 'not available'} "
      f"(name, driver, memory); CUDA (driver) {smi.get('cuda_version') or 'n/a'}.",
      f"- Host: {i.get('cpu', 'n/a')}, {i.get('cores', 'n/a')} cores; "
      f"{host.get('hostname_platform')}.",
      f"- Python {host.get('python')}; " + ", ".join(
          f"{k} {v}" for k, v in host.get("versions", {}).items()) + ".",
      f"- Benchmarks ran at JAX's default matmul precision "
      f"(`{i.get('default_matmul_precision')}`; on GPU f32 convolutions and matmuls "
      "may use TF32).",
      f"- Code: optax_splitlbi sources sha256 `{host.get('package_sha256')}` "
      f"(`python -c 'from benchmarks.common import package_hash; print(package_hash())'`); "
      f"git HEAD of the copy `{host.get('git_commit') or 'n/a'}` (may be stale).\n"]


def _device_update(sec: dict | None) -> list[str]:
  L = ["## Update only (jitted `update` + `apply_updates`, params and state donated, f32)\n"]
  u = (sec or {}).get("result")
  if not u or "copy" not in u:
    return L + [f"Not run: {(sec or {}).get('status', 'no result')}.\n"]
  c = u["copy"]
  L.append(f"Copy bandwidth: **{c['bandwidth'] / 1e9:,.0f} GB/s** (donated jitted `x + 1` over "
           f"{c['bytes'] / 2 / 2**20:,.0f} MiB, median of {c['n']} samples of "
           f"{c['calls_per_sample']} calls). " + UPDATE_INTRO)
  return L + update_table(u["trees"])


def _device_train(res: dict) -> list[str]:
  L = ["## Train step (forward + backward + update), synthetic data\n",
       "Models from `examples/models.py`, softmax cross-entropy, params / batch statistics / "
       "optimizer state donated. *paired* = median over rounds of (time ÷ SGD time in the "
       "same round). *Peak* = `peak_bytes_in_use` of `device.memory_stats()` after "
       "3 steps, measured in a second process that loads the compiled steps from a "
       "compilation cache the timing process filled (so the autotuner's scratch buffers are "
       "not counted; *load s* is that load, far below *compile s* on a cache hit). There the "
       "optimizers run in order of increasing state (SGD, lean, default), the previous one's "
       "buffers freed, so each peak is its own unless marked ≤ (it did not rise above the "
       "previous one). *XLA temp* = the compiled step's temporary buffers "
       "(`memory_analysis()`); *opt. state* = bytes of the optimizer state.\n"]
  measured = [(k, r) for k, r in trains(res) if r.get("compile")]
  L += train_table(measured)
  for key, r in measured:
    L.append(f"- {key}: {r['model']}, input {'×'.join(map(str, r['input_shape']))}, "
             f"{r['params']:,} parameters; memory process: "
             f"{(res['sections'][f'train {key}'].get('memory_run') or {}).get('status')}.")
  L.extend(f"- {k}: not measured ({res['sections'][f'train {k}'].get('status')})."
           for k, r in trains(res) if not r.get("compile"))
  return L + [""]


def render_device(res: dict, head: Sequence[str] = ()) -> list[str]:
  """RESULTS_GPU.md: the device, ``head``, the update and train sections, problems."""
  smoke = " — **smoke run (CPU, tiny)**" if res["mode"] == "smoke" else ""
  L = ["# optax_splitlbi on an accelerator\n",
       f"Generated by `{res['command']}` on {res['date']} in {res.get('total_s', 0):.0f} s "
       f"(budget {res['budget_s']:.0f} s){smoke}; exit code {res.get('exit_code', 0)}. "
       "Raw numbers: `results_gpu.json`; logs: `log_*.txt`.\n"]
  L += _device_lines(res) + list(head)
  L += _device_update(res["sections"].get("update")) + _device_train(res)
  return L + ["## Skipped or failed\n", *(problems(res) or ["- nothing"]), ""]


def render(res: dict, head: Sequence[str] = ()) -> str:
  """The markdown report of a run; ``head``: lines placed after the machine section
  (``tools.device_check`` puts its test results there)."""
  lines = (render_device if res["mode"] in DEVICE_MODES else render_cpu)(res, head)
  return "\n".join(lines) + "\n"


def summary(res: dict, head: Sequence[str] = (), title: str = "benchmarks") -> str:
  """A short fixed-width table for the end of a device run's output (what a caller sees)."""
  i = info(res)
  L = [f"== {title}: {i.get('device_kind', '?')} ({i.get('platform', '?')}), "
       f"{res.get('total_s', 0):.0f} s of {res['budget_s']:.0f} s budget, "
       f"exit code {res.get('exit_code', 0)} ==", *head]
  u = result(res, "update") or {}
  if "copy" in u:
    L.append(f"copy bandwidth {u['copy']['bandwidth'] / 1e9:,.0f} GB/s; update "
             f"({res['sections']['update'].get('wall_s', 0):.0f} s):")
    L.append(f"  {'tree':<18}{'optimizer':<15}{'ms':>9}{'BW frac':>9}{'/SGD':>7}")
    for tree, r in u.get("trees", {}).items():
      for name, o in r["opts"].items():
        L.append(f"  {tree:<18}{name:<15}{ms(o['median']):>9}"
                 f"{o['fraction_of_copy_bandwidth']:>9.2f}{num(o.get('ratio_vs_sgd')):>7}")
  L.append(f"  {'train':<18}{'optimizer':<15}{'ms':>9}{'/SGD':>7}{'paired':>8}{'peak MiB':>10}")
  for key, r in trains(res):
    for name in r.get("compile", {}):
      m, o = r.get("memory", {}).get(name, {}), r.get("opts", {}).get(name, {})
      pr = o.get("paired_ratio")
      L.append(f"  {key:<18}{name:<15}{ms(o.get('median')):>9}"
               f"{num(o.get('ratio_vs_sgd'), '.3f'):>7}{num(pr and pr['median'], '.3f'):>8}"
               f"{mib(m.get('peak_bytes_in_use')):>10}")
  L.extend(problems(res) or ["nothing skipped or failed"])
  return "\n".join(L)
