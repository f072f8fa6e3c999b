"""``RESULTS_GPU.md`` and the closing summary of ``benchmarks.device_check``."""

from __future__ import annotations

MIB = 2**20


def _ms(x) -> str:
  if x is None:
    return "n/a"
  return f"{x * 1e3:.3f}" if x < 0.01 else f"{x * 1e3:.2f}" if x < 1 else f"{x * 1e3:.0f}"


def _num(x, fmt: str = ".2f") -> str:
  return "n/a" if x is None else format(x, fmt)


def _mib(x) -> str:
  return "n/a" if x is None else f"{x / MIB:,.0f}" if x >= 10 * MIB else f"{x / MIB:.2f}"


def _info(res: dict) -> dict:
  """Device info from the first section that reported it."""
  for sec in res["sections"].values():
    if isinstance(sec, dict) and sec.get("info"):
      return sec["info"]
  return {}


def _trains(res: dict):
  for name, sec in res["sections"].items():
    if name.startswith("train "):
      yield name[len("train "):], sec


def _device_lines(res: dict) -> list[str]:
  info, host = _info(res), res["host"]
  smi = host.get("nvidia_smi") or {}
  limit = info.get("bytes_limit")
  L = ["## Device\n",
       f"- JAX backend `{info.get('platform', 'n/a')}`, device `{info.get('device_kind', 'n/a')}`"
       f" ({len(info.get('devices', []))} visible); JAX allocator limit "
       f"{_num(limit and limit / 2**30, '.1f')} GiB.",
       f"- nvidia-smi: {'; '.join(smi.get('gpus', [])) or 'not available'} "
       f"(name, driver, memory); CUDA (driver) {smi.get('cuda_version') or 'n/a'}.",
       f"- Host: {info.get('cpu', 'n/a')}, {info.get('cores', 'n/a')} cores; "
       f"{host.get('hostname_platform')}.",
       f"- Python {host.get('python')}; " + ", ".join(
           f"{k} {v}" for k, v in host.get("versions", {}).items()) + ".",
       f"- Benchmarks ran at JAX's default matmul precision "
       f"(`{info.get('default_matmul_precision')}`; on GPU f32 convolutions and matmuls "
       "may use TF32); the tests ran with `JAX_DEFAULT_MATMUL_PRECISION=highest`.",
       f"- Code: optax_splitlbi sources sha256 `{host.get('package_sha256')}` "
       f"(`python -c 'from benchmarks.device_check import package_hash; print(package_hash())'`); "
       f"git HEAD of the copy `{host.get('git_commit') or 'n/a'}` (may be stale).\n"]
  return L


def _tests_lines(t: dict | None) -> list[str]:
  L = ["## Correctness tests on the device\n"]
  if not t or "passed" not in t:
    return L + [f"Not run: {(t or {}).get('status', 'no result')}.\n"]
  sel = t.get("selection", {})
  L.append(f"`pytest {' '.join(sel.get('files', []))} -k {sel.get('k')!r}` with "
           "`JAX_DEFAULT_MATMUL_PRECISION=highest`, hypothesis examples capped at "
           f"{t.get('env', {}).get('hypothesis max_examples')}; backend `{t.get('backend')}` "
           f"({t.get('device_kind')}). Status **{t['status']}** in {t.get('wall_s', 0):.0f} s: "
           f"**{t['passed']} passed, {t['failed']} failed, {t['errors']} errors**, "
           f"{t['skipped']} skipped, {t.get('deselected', 0)} deselected.\n")
  if t.get("failures"):
    L.append("Failures:\n")
    L.extend(f"- `{n}`" for n in t["failures"])
    L.append("")
  return L


def _update_lines(u: dict | None) -> list[str]:
  L = ["## Update only (jitted `update` + `apply_updates`, params and state donated, f32)\n"]
  if not u or "copy" not in u:
    return L + [f"Not run: {(u or {}).get('status', 'no result')}.\n"]
  c = u["copy"]
  L.append(f"Copy bandwidth: **{c['bandwidth'] / 1e9:,.0f} GB/s** (donated jitted `x + 1` over "
           f"{c['bytes'] / 2 / 2**20:,.0f} MiB, read + write counted; median of {c['n']} "
           f"samples of {c['calls_per_sample']} calls). *Bytes* = compulsory traffic of a fused "
           "update (`benchmarks/optimizers.py`); *BW frac* = (bytes ÷ time) ÷ the copy "
           "bandwidth measured interleaved with the same tree. One sample = many chained "
           "calls then one `block_until_ready`; median over rounds.\n")
  L.append("| tree | params | leaves | optimizer | median ms | IQR ms | calls/sample | GB moved "
           "| GB/s | BW frac | ÷ SGD | compile s |")
  L.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for tree, r in u.get("trees", {}).items():
    for name, o in r["opts"].items():
      L.append(f"| {tree} | {r['params']:,} | {r['leaves']} | {name} | {_ms(o['median'])} | "
               f"{_ms(o['iqr'])} | {o['calls_per_sample']} | {o['bytes'] / 1e9:.3f} | "
               f"{o['achieved_bandwidth'] / 1e9:,.0f} | {o['fraction_of_copy_bandwidth']:.2f} | "
               f"{_num(o.get('ratio_vs_sgd'))} | {o['compile_s']:.1f} |")
  L.append("")
  L.extend(f"- {tree}: interleaved {r['interleaved']}"
           + (f"; skipped (budget): {', '.join(r['skipped'])}" if r.get("skipped") else "")
           for tree, r in u.get("trees", {}).items())
  L.append("")
  return L


def _train_rows(key: str, r: dict) -> list[str]:
  timing, mem, comp = r.get("timing", {}), r.get("memory", {}), r.get("compile", {})
  sgd_peak = mem.get("sgd", {}).get("peak_bytes_in_use")
  rows = []
  for name, c in comp.items():
    t, m = timing.get(name, {}), mem.get(name, {})
    pr, peak = t.get("paired_ratio"), m.get("peak_bytes_in_use")
    bound = "" if m.get("peak_rose", True) else "≤ "
    delta = peak - sgd_peak if peak is not None and sgd_peak is not None else None
    rows.append(
        f"| {key} | {r['batch']} | {name} | {_ms(t.get('median'))} | {_ms(t.get('iqr'))} | "
        f"{_num(t.get('ratio_vs_sgd'), '.3f')} | {_num(pr and pr['median'], '.3f')} | "
        f"{bound}{_mib(peak)} | {_mib(delta)} | {_mib(c.get('state_bytes'))} | "
        f"{_mib((c.get('memory_analysis') or {}).get('temp_size_in_bytes'))} | "
        f"{c['compile_s']:.1f} | {_num(m.get('load_s'), '.1f')} |")
  return rows


def _train_lines(res: dict) -> list[str]:
  L = ["## Train step (forward + backward + update), synthetic data\n",
       "Models from `examples/models.py`, softmax cross-entropy, params / batch statistics / "
       "optimizer state donated. *paired* = median over rounds of (time ÷ SGD time in the "
       "same round). *Peak* = `peak_bytes_in_use` of `device.memory_stats()` after "
       f"{3} steps, measured in a second process that loads the compiled steps from a "
       "compilation cache the timing process filled (so the autotuner's scratch buffers are "
       "not counted; *load s* is that load, far below *compile s* on a cache hit). There the "
       "optimizers run in order of increasing state (SGD, lean, default), the previous one's "
       "buffers freed, so each peak is its own unless marked ≤ (it did not rise above the "
       "previous one). *XLA temp* = the compiled step's temporary buffers "
       "(`memory_analysis()`); *opt. state* = bytes of the optimizer state.\n",
       "| model | batch | optimizer | median ms | IQR ms | ÷ SGD | ÷ SGD (paired) | peak MiB "
       "| peak − SGD MiB | opt. state MiB | XLA temp MiB | compile s | load s |",
       "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  notes = []
  for key, sec in _trains(res):
    r = sec.get("result")
    if not r or not r.get("compile"):
      notes.append(f"- {key}: not measured ({sec.get('status')}).")
      continue
    L.extend(_train_rows(key, r))
    notes.append(f"- {key}: {r['model']}, input {'×'.join(map(str, r['input_shape']))}, "
                 f"{r['params']:,} parameters; memory process: "
                 f"{(sec.get('memory_run') or {}).get('status')}.")
  return L + [""] + notes + [""]


def _problems(res: dict) -> list[str]:
  """Every section that did not finish, everything skipped, every error."""
  out = []
  for name, sec in res["sections"].items():
    if sec.get("status") != "ok":
      last = [x for x in (sec.get("log_tail") or "").splitlines() if x.strip()][-1:]
      out.append(f"- {name}: {sec.get('status')}" + (f": `{last[0].strip()[:300]}`" if last else ""))
    if isinstance(sec.get("skipped"), list):  # the tests' "skipped" is pytest's count
      out.extend(f"- {name}: {item} skipped (budget)" for item in sec["skipped"])
    for tree, r in sec.get("trees", {}).items():
      out.extend(f"- {name} {tree}: {o} skipped (budget)" for o in r.get("skipped", []))
      out.extend(f"- {name} {tree} {o}: error `{e.strip().splitlines()[-1]}`"
                 for o, e in r.get("errors", {}).items())
    r = sec.get("result") or {}
    out.extend(f"- {name}: {o} skipped (budget)" for o in r.get("skipped", []))
    out.extend(f"- {name}: peak memory of {o} skipped (budget)"
               for o in r.get("memory_skipped", []))
    for o, m in r.get("memory", {}).items():
      if m.get("load_s", 0) > 0.5 * r.get("compile", {}).get(o, {}).get("compile_s", 1e9):
        out.append(f"- {name}: {o}: the memory process missed the compilation cache (load s "
                   "≈ compile s); its peak may include autotuning scratch")
    mem_run = sec.get("memory_run") or {"status": "ok"}
    if mem_run.get("status") != "ok":
      out.append(f"- {name}: memory process {mem_run.get('status')}")
    if mem_run.get("error"):
      out.append(f"- {name}: memory error `{mem_run['error'].strip().splitlines()[-1]}`")
    errors = sec.get("errors")  # the tests' "errors" is pytest's count
    for tree, err in (errors.items() if isinstance(errors, dict) else ()):
      out.append(f"- {name} {tree}: error `{err.strip().splitlines()[-1]}`")
    if sec.get("error"):
      out.append(f"- {name}: error `{sec['error'].strip().splitlines()[-1]}`")
  return out


def render(res: dict) -> str:
  """The markdown report of one ``device_check`` run."""
  L = ["# optax_splitlbi on an accelerator\n",
       f"Generated by `{res['command']}` on {res['date']} in {res.get('total_s', 0):.0f} s "
       f"(budget {res['budget_s']:.0f} s){' — **smoke run (CPU, tiny)**' if res['smoke'] else ''}"
       f"; exit code {res.get('exit_code')}. Raw numbers: `results_gpu.json`; logs: "
       "`log_*.txt`, `junit_tests.xml`.\n"]
  L += _device_lines(res)
  L += _tests_lines(res["sections"].get("tests"))
  L += _update_lines(res["sections"].get("update"))
  L += _train_lines(res)
  problems = _problems(res)
  L += ["## Skipped or failed\n", *(problems or ["- nothing"]), ""]
  return "\n".join(L) + "\n"


def summary(res: dict) -> str:
  """A short fixed-width table for the end of the output (the part a caller sees)."""
  info, t = _info(res), res["sections"].get("tests") or {}
  L = [f"== device_check: {info.get('device_kind', '?')} ({info.get('platform', '?')}), "
       f"{res.get('total_s', 0):.0f} s of {res['budget_s']:.0f} s budget, "
       f"exit code {res.get('exit_code')} ==",
       f"tests: {t.get('status', 'not run')}: {t.get('passed', 0)} passed, "
       f"{t.get('failed', 0)} failed, {t.get('errors', 0)} errors, backend {t.get('backend')}, "
       f"{t.get('wall_s', 0):.0f} s"]
  L.extend(f"  FAILED {n}" for n in t.get("failures", [])[:30])
  if not res["smoke"] and t.get("backend") not in (None, "gpu", "tpu"):
    L.append(f"  WARNING: the tests ran on backend {t.get('backend')}, not on an accelerator")
  u = res["sections"].get("update") or {}
  if "copy" in u:
    L.append(f"copy bandwidth {u['copy']['bandwidth'] / 1e9:,.0f} GB/s; update "
             f"({u.get('wall_s', 0):.0f} s):")
    L.append(f"  {'tree':<18}{'optimizer':<15}{'ms':>9}{'BW frac':>9}{'/SGD':>7}")
    for tree, r in u.get("trees", {}).items():
      for name, o in r["opts"].items():
        L.append(f"  {tree:<18}{name:<15}{_ms(o['median']):>9}"
                 f"{o['fraction_of_copy_bandwidth']:>9.2f}{_num(o.get('ratio_vs_sgd')):>7}")
  L.append(f"  {'train':<18}{'optimizer':<15}{'ms':>9}{'/SGD':>7}{'paired':>8}{'peak MiB':>10}")
  for key, sec in _trains(res):
    r = sec.get("result") or {}
    for name in r.get("compile", {}):
      m, o = r.get("memory", {}).get(name, {}), r.get("timing", {}).get(name, {})
      pr = o.get("paired_ratio")
      L.append(f"  {key:<18}{name:<15}{_ms(o.get('median')):>9}"
               f"{_num(o.get('ratio_vs_sgd'), '.3f'):>7}{_num(pr and pr['median'], '.3f'):>8}"
               f"{_mib(m.get('peak_bytes_in_use')):>10}")
  L.extend(_problems(res) or ["nothing skipped or failed"])
  return "\n".join(L)
