"""The update under XLA:CPU's multi-output fusion pass (one kernel per leaf).

With ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
set, ``splitlbi`` (``xla_cpu_form="auto"``) picks its fusion-friendly CPU form
(``_xla_cpu.fused_penalized_leaf_step``). Its numbers are checked against the
NumPy reference in ``test_transform.py`` (and lean / bf16 modes in
``test_memory_modes.py``, via the ``update_form`` fixture of ``conftest.py``);
here a fresh process with the flag set checks the compiled structure of a
donated train-step update (no buffer copies; per leaf one multi-output kernel
writing the update, b' and, where penalized, V' and, for lasso, Γ') and that it
agrees with the equations form compiled in the same process.
"""

import json
import os
import subprocess
import sys

import pytest

import optax_splitlbi as osl
from optax_splitlbi import _xla_cpu

MOF_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"

CHILD = r"""
import json, os, re, sys
import jax, jax.numpy as jnp, numpy as np, optax
import optax_splitlbi as osl

store_gamma = sys.argv[1] == "stored"
shapes = {"conv": {"kernel": (3, 3, 8, 16), "bias": (16,)}, "dense": {"kernel": (64, 32)}}
rng = np.random.default_rng(0)
target = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))
params0 = jax.tree.map(jnp.zeros_like, target)


def compiled(opt):
  def step(p, s):
    g = jax.tree.map(lambda w, t: w - t, p, target)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s
  f = jax.jit(step, donate_argnums=(0, 1))
  state = opt.init(params0)
  return f, f.lower(params0, state).compile().as_text(), state


def run(f, state, steps=30):
  p = jax.tree.map(jnp.copy, params0)
  for _ in range(steps):
    p, state = f(p, state)
  return jax.tree.map(np.asarray, (p, state.v))


kw = dict(nu=2.0, lam=0.5, weight_decay=1e-3, store_gamma=store_gamma)
f, hlo, state = compiled(osl.splitlbi(0.1, **kw))  # "auto": the flag is set
entry = hlo[hlo.index("ENTRY"):]
mof = re.findall(r"= \(([^)]*)\) fusion\(", entry)
# Copies of parameter-sized arrays (rank >= 2; the scalars κ and t are tiny).
out = {"copies": len(re.findall(r"f32\[\d+,[^\]]*\]\S* copy\(", entry)),
       "mof_outputs": sorted(len(m.split("f32[")) - 1 for m in mof)}
fused = run(f, state)
f2, _, state2 = compiled(osl.splitlbi(0.1, **kw, xla_cpu_form="equations"))
plain = run(f2, state2)
out["max_abs_diff"] = max(float(np.max(np.abs(a - b)))
                          for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)))
out["max_abs"] = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(fused))
print(json.dumps(out))
"""


def test_flag_detection(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert _xla_cpu.resolve_form("auto") == "buffered"
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {MOF_FLAG}")
  assert _xla_cpu.resolve_form("auto") == "fused"
  assert _xla_cpu.resolve_form("equations") == "equations"
  with pytest.raises(ValueError, match="xla_cpu_form"):
    osl.splitlbi(0.1, xla_cpu_form="gpu")


@pytest.mark.parametrize("mode", ["stored", "lean"])
def test_one_kernel_per_penalized_leaf_under_the_flag(mode):
  env = dict(os.environ, XLA_FLAGS=MOF_FLAG, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(osl.__file__))
  proc = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # Donated params and state are updated in place: no buffer is copied.
  assert out["copies"] == 0, out
  # One kernel per leaf: the bias (momentum SGD) writes ΔW, b'; conv (group)
  # ΔW, b', V' (Γ' needs the norms of V' first); dense (lasso) also Γ' when stored.
  assert out["mof_outputs"] == ([2, 3, 4] if mode == "stored" else [2, 3, 3]), out
  # Same numbers as the line-by-line form (30 steps; values are O(1)).
  assert out["max_abs"] > 0.1
  assert out["max_abs_diff"] < 1e-5, out
