"""Groups that span leaves (ChannelGroups) against an independent NumPy implementation."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import optax_splitlbi as sl

# Leaves: a residual-like class "res" (a conv's filters, its BatchNorm scale and
# shift, a 1×1 conv's filters: four shapes, four axes), a head class "heads"
# (a (D, H, Dh) projection on axis 1 and its (H, Dh) bias, plus a (H, Dh, E)
# output projection whose slices only enter the norm and keep their lasso),
# and per-leaf penalties: filter groups, lasso, none.
SHAPES = {
    "conv/kernel": (3, 3, 2, 4), "bn/scale": (4,), "bn/bias": (4,), "conv2/kernel": (1, 1, 4, 4),
    "qkv/kernel": (5, 4, 3), "qkv/bias": (4, 3), "out/kernel": (4, 3, 6),
    "conv3/kernel": (3, 3, 2, 5), "dense/kernel": (6, 3), "dense/bias": (3,)}
RES = sl.GroupClass("res", 4, (("conv/kernel", 3), ("bn/scale", 0), ("bn/bias", 0),
                               ("conv2/kernel", 3)), lam=0.6)
HEADS = sl.GroupClass("heads", 4, (("qkv/kernel", 1), ("qkv/bias", 0)),
                      norm_only=(("out/kernel", 0),), lam=0.15, normalized=True)
# Per-leaf rules for the rest: filter groups, lasso, none.
REST = {"conv3/kernel": ("group", 0.5), "dense/kernel": ("lasso", 0.5), "out/kernel": ("lasso", 0.5),
        "dense/bias": (None, 0)}


def _group_axis(name):
  """The axis that indexes groups in the NumPy reference (class members)."""
  for cls in (RES, HEADS):
    for path, axis in cls.members:
      if path == name:
        return cls.name, axis
  return None, None


def _sq(x, axis):
  return np.sum(x * x, axis=tuple(a for a in range(x.ndim) if a != axis))


def np_prox_all(v, kappa):
  """Γ = κ·Prox(V) of every penalized leaf, class groups with one norm over all members."""
  gam = {}
  for cls in (RES, HEADS):
    slices = list(cls.members) + list(cls.norm_only)
    sq = sum(_sq(v[p], a) for p, a in slices)
    d = sum(math.prod(SHAPES[p]) // cls.size for p, _ in slices)
    t = cls.lam * math.sqrt(d) if cls.normalized else cls.lam
    norm = np.sqrt(sq)
    factor = np.where(norm > t, 1 - t / np.where(norm > 0, norm, 1), 0.0)
    for p, a in cls.members:
      shape = [1] * v[p].ndim
      shape[a] = -1
      gam[p] = kappa * factor.reshape(shape) * v[p]
  for p, (kind, t) in REST.items():
    if kind == "lasso":
      gam[p] = kappa * np.sign(v[p]) * np.maximum(np.abs(v[p]) - t, 0)
    elif kind == "group":
      norm = np.sqrt(np.sum(v[p] ** 2, axis=(0, 1, 2), keepdims=True))
      gam[p] = kappa * np.where(norm > t, 1 - t / np.where(norm > 0, norm, 1), 0) * v[p]
  return gam


def np_run(w0, coef, target, steps, *, lr, kappa, nu, tau, nesterov, wd, coupling,
           round_w=None):
  """SplitLBI in float64; ``round_w[name]``: a dtype the param is stored in after each step."""
  w = {k: x.astype(np.float64) for k, x in w0.items()}
  b = {k: np.zeros_like(x) for k, x in w.items()}
  v = {k: np.zeros_like(x) for k, x in w.items() if REST.get(k, ("x",))[0] is not None}
  gam = {k: np.zeros_like(x) for k, x in v.items()}
  entry = {}
  hist = []
  for k in range(steps):
    new_w = {}
    for n in w:
      g = coef[n] * (w[n] - target[n]) + (wd * w[n] if w[n].ndim > 1 else 0.0)
      c = (w[n] - gam[n]) / nu if n in v else 0.0
      if coupling == "momentum":
        g = g + c
      b[n] = tau * b[n] + g
      d = g + tau * b[n] if nesterov else b[n]
      if coupling == "outside":
        d = d + c
      new_w[n] = w[n] - kappa * lr * d
      if round_w and n in round_w:  # optax.apply_updates in the param's dtype
        step = (new_w[n] - w[n]).astype(round_w[n]).astype(np.float64)
        new_w[n] = (w[n].astype(round_w[n]) + step.astype(round_w[n])).astype(np.float64)
    for n in v:
      v[n] = v[n] - (lr / nu) * (gam[n] - w[n])
    gam = np_prox_all(v, kappa)
    for cls in (RES, HEADS):  # the first step a class group is nonzero
      p, a = cls.members[0]
      nz = _sq(gam[p], a) > 0
      prev = entry.get(cls.name, np.full(cls.size, -1))
      entry[cls.name] = np.where((prev < 0) & nz, k + 1, prev)
    w = new_w
    hist.append(({n: x.copy() for n, x in w.items()}, dict(v), dict(gam), dict(entry)))
  return hist


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  w0, coef, target = {}, {}, {}
  for n, shape in SHAPES.items():
    cls, axis = _group_axis(n)
    if cls is None and n != "out/kernel":
      axis = len(shape) - 1
    elif n == "out/kernel":
      axis = 0
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    scale = np.array([0.05, 0.3, 1.0, 2.0, 1.5])[:shape[axis]].reshape(scale_shape)
    w0[n] = rng.normal(size=shape) * scale
    coef[n] = rng.uniform(0.5, 1.5, size=shape)
    target[n] = rng.normal(size=shape) * scale * 2
  return w0, coef, target


def _tree(flat, dtypes=None):
  tree = {}
  for n, x in flat.items():
    mod, leaf = n.split("/")
    tree.setdefault(mod, {})[leaf] = jnp.asarray(x, (dtypes or {}).get(n, jnp.float32))
  return tree


def _get(tree, n):
  mod, leaf = n.split("/")
  return np.asarray(tree[mod][leaf], np.float64)


def _penalty():
  def rest(path, leaf):
    name = sl.penalties.path_str(path)
    kind, t = REST.get(name, (None, 0))
    return {"lasso": sl.Lasso(t), "group": sl.conv_filters(t), None: None}[kind]
  return sl.ChannelGroups((RES, HEADS), rest=rest)


def _run_jax(tx, w0, coef, target, steps, dtypes=None):
  params = _tree(w0, dtypes)
  c, t = _tree(coef), _tree(target)

  def loss(p):
    return sum(jnp.sum(0.5 * ci * (pi.astype(jnp.float32) - ti) ** 2) for ci, pi, ti in
               zip(jax.tree.leaves(c), jax.tree.leaves(p), jax.tree.leaves(t)))

  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  out = []
  for _ in range(steps):
    params, state = step(params, state)
    out.append((params, state))
  return out


CASES = {
    "default": dict(),
    "nesterov_wd": dict(nesterov=True, weight_decay=0.02),
    "coupling_momentum": dict(coupling="momentum", kappa=2.0, learning_rate=0.05),
}


@pytest.mark.parametrize("store_gamma", [True, False], ids=["stored", "lean"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cross_leaf_matches_numpy(case, store_gamma, update_form):
  opts = dict(learning_rate=0.1, kappa=1.0, nu=2.0, momentum=0.9)
  opts.update(CASES[case])
  steps = 20
  w0, coef, target = _problem()
  tx = sl.splitlbi(**opts, penalty=_penalty(), store_gamma=store_gamma, record_path=True,
                   xla_cpu_form=update_form)
  got = _run_jax(tx, w0, coef, target, steps)
  ref = np_run(w0, coef, target, steps, lr=opts["learning_rate"], kappa=opts["kappa"],
               nu=opts["nu"], tau=opts["momentum"], nesterov=opts.get("nesterov", False),
               wd=opts.get("weight_decay", 0.0), coupling=opts.get("coupling", "outside"))
  for (params, state), (w_ref, v_ref, g_ref, e_ref) in zip(got, ref):
    gamma = sl.gamma(state)
    for n in SHAPES:
      np.testing.assert_allclose(_get(params, n), w_ref[n], rtol=2e-4, atol=2e-5, err_msg=n)
      if n in v_ref:
        np.testing.assert_allclose(_get(state.v, n), v_ref[n], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(_get(gamma, n), g_ref[n], rtol=2e-4, atol=2e-5, err_msg=n)
    entries = sl.entry_steps(state)
    for cls in (RES, HEADS):
      for p, a in cls.members:  # every member holds the class's entry steps
        np.testing.assert_array_equal(_get(entries, p).reshape(-1), e_ref[cls.name])
  # Both sides of the prox are exercised: some class groups in, some out.
  for cls in (RES, HEADS):
    e = ref[-1][3][cls.name]
    assert (e > 0).any() and (e < 0).any(), (cls.name, e)


def test_mixed_dtypes_in_one_class():
  """A class whose members are float32 and bfloat16 params (float32 state)."""
  dtypes = {"bn/scale": jnp.bfloat16, "bn/bias": jnp.bfloat16}
  w0, coef, target = _problem(1)
  w0 = {n: x.astype(ml_dtypes.bfloat16).astype(np.float64) if n in dtypes else x
        for n, x in w0.items()}
  tx = sl.splitlbi(0.1, nu=2.0, penalty=_penalty(), state_dtype=jnp.float32)
  got = _run_jax(tx, w0, coef, target, 10, dtypes)
  ref = np_run(w0, coef, target, 10, lr=0.1, kappa=1.0, nu=2.0, tau=0.9, nesterov=False,
               wd=0.0, coupling="outside", round_w={n: ml_dtypes.bfloat16 for n in dtypes})
  for (params, state), (w_ref, v_ref, g_ref, _) in zip(got, ref):
    assert params["bn"]["scale"].dtype == jnp.bfloat16
    assert state.v["bn"]["scale"].dtype == jnp.float32
    for n in RES.members:
      tol = 2e-2 if n[0] in dtypes else 2e-3
      np.testing.assert_allclose(_get(params, n[0]), w_ref[n[0]], rtol=tol, atol=tol)
      np.testing.assert_allclose(_get(sl.gamma(state), n[0]), g_ref[n[0]], rtol=tol, atol=tol)


def _final_state(steps=20):
  w0, coef, target = _problem()
  tx = sl.splitlbi(0.1, nu=2.0, penalty=_penalty(), record_path=True)
  params, state = _run_jax(tx, w0, coef, target, steps)[-1]
  return params, state


def test_toolkit_speaks_classes():
  params, state = _final_state()
  sup = sl.support(state)
  gsup = sl.group_support(state)
  res = np.asarray(gsup["conv"]["kernel"]).reshape(-1)
  assert 0 < res.sum() < 4
  for p, a in RES.members:  # one decision per class, the same in every member
    m = _get(sup, p)
    other = tuple(x for x in range(m.ndim) if x != a)
    np.testing.assert_array_equal(m.all(axis=other), res)
    np.testing.assert_array_equal(m.any(axis=other), res)
  # sparsity_report: per class, its channels in supp Γ; groups counted once in the total.
  rep = sl.sparsity_report(state)
  assert rep["classes"]["res"]["nonzero_groups"] == res.sum()
  assert rep["classes"]["res"]["groups"] == 4
  assert set(rep["classes"]["res"]["members"]) == {p for p, _ in RES.members}
  per_leaf = {"conv3/kernel": 5, "dense/kernel": 18, "out/kernel": 72}
  assert rep["total"]["groups"] == 4 + 4 + sum(per_leaf.values())
  assert "res" in sl.format_report(rep)


def test_prune_to_sparsity_keeps_whole_classes_and_nests():
  params, state = _final_state()
  entries = sl.entry_steps(state)
  order = np.asarray(entries["conv"]["kernel"]).reshape(-1)
  prev = None
  for target in (0.25, 0.5, 0.75):
    masks = sl.prune_to_sparsity(params, state, target, scope="layer")
    keep = _get(masks, "conv/kernel").all(axis=(0, 1, 2))
    assert keep.sum() == round(target * 4)
    for p, a in RES.members:  # the same channels in every member
      m = _get(masks, p)
      np.testing.assert_array_equal(m.any(axis=tuple(x for x in range(m.ndim) if x != a)), keep)
    # Entered groups first (entry step ascending).
    entered = np.where(order > 0, order, np.iinfo(np.int32).max)
    assert entered[keep].max() <= entered[~keep].min()
    if prev is not None:
      assert (prev <= keep).all()  # nested
    prev = keep
  ranks = sl.importance_ranks(state, scope="layer")
  r = np.asarray(ranks["bn"]["scale"]).reshape(-1)
  np.testing.assert_array_equal(np.asarray(ranks["conv"]["kernel"]).reshape(-1), r)
  assert sorted(r) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="res"):  # a per-layer mapping names the class
    sl.prune_to_sparsity(params, state, {"conv/kernel": 0.5}, scope="layer")


def test_bad_class_specs_name_class_and_leaf():
  params = _tree(_problem()[0])
  bad = [
      (sl.GroupClass("c", 4, (("conv/kernel", 3), ("nope/kernel", 0))), "'c'.*'nope/kernel'"),
      (sl.GroupClass("c", 4, (("conv/kernel", 3), ("conv3/kernel", 3))), "'c'.*'conv3/kernel'"),
      (sl.GroupClass("c", 4, (("conv/kernel", 7),)), "'c'.*axis 7.*'conv/kernel'"),
  ]
  for cls, pattern in bad:
    with pytest.raises(ValueError, match=pattern):
      sl.splitlbi(0.1, penalty=sl.ChannelGroups((cls,))).init(params)
  overlap = sl.ChannelGroups((RES, sl.GroupClass("other", 4, (("bn/scale", 0),))))
  with pytest.raises(ValueError, match="'bn/scale'.*'res' and 'other'"):
    sl.splitlbi(0.1, penalty=overlap).init(params)
  no_v = sl.ChannelGroups((HEADS,), rest=lambda path, leaf: None)
  with pytest.raises(ValueError, match="out/kernel"):
    sl.splitlbi(0.1, penalty=no_v).init(params)


def test_state_structure_independent_of_values():
  params = _tree(_problem()[0])
  a = sl.splitlbi(0.1, penalty=_penalty()).init(params)
  b = optax.inject_hyperparams(sl.splitlbi)(learning_rate=0.3, lam=2.0, kappa=3.0,
                                            penalty=_penalty()).init(params)
  assert jax.tree.structure(a) == jax.tree.structure(sl.find_state(b))
  assert a.penalty["bn"]["scale"].shared == "res"
  assert a.penalty["out"]["kernel"].norm_of == (("heads", 0),)
  d = 5 * 3 + 3 + 3 * 6
  assert a.penalty["qkv"]["kernel"].group_size == d
  t = sl.masks.thresholds(a)
  np.testing.assert_allclose(t["bn"]["bias"], 0.6)
  np.testing.assert_allclose(t["qkv"]["bias"], 0.15 * math.sqrt(d), rtol=1e-6)


def np_adam(m, s, g, k, b1=0.9, b2=0.999, eps=1e-8):
  """One Adam direction m̂/(√ŝ + ε) at step k; updates the moments m, s in place."""
  m *= b1
  m += (1 - b1) * g
  s *= b2
  s += (1 - b2) * g * g
  return (m / (1 - b1 ** k)) / (np.sqrt(s / (1 - b2 ** k)) + eps)


def np_run_adam(w0, coef, target, steps, *, lr, kappa, nu, wd, through=False, dual=False):
  """SplitLBI with an Adam direction (AdaBreg-style), decoupled weight decay, in float64;
  ``through``: Adam of ∇L + (W − Γ)/ν (the coupling inside the preconditioner); ``dual``:
  V' = V + α·Adam₂((W − Γ)/ν), a second Adam of its own. ``nu``: a number or a function
  of the step count (0 at the first update, as optax schedules)."""
  nu_at = nu if callable(nu) else lambda count: nu
  w = {k: x.astype(np.float64) for k, x in w0.items()}
  m, s = ({k: np.zeros_like(x) for k, x in w.items()} for _ in range(2))
  v = {k: np.zeros_like(x) for k, x in w.items() if REST.get(k, ("x",))[0] is not None}
  gam = {k: np.zeros_like(x) for k, x in v.items()}
  dm, ds = ({k: np.zeros_like(x) for k, x in v.items()} for _ in range(2))
  hist = []
  for k in range(1, steps + 1):
    new_w, nu = {}, nu_at(k - 1)
    for n in w:
      c = (w[n] - gam[n]) / nu if n in v else 0.0
      g = coef[n] * (w[n] - target[n]) + (c if through else 0.0)
      d = np_adam(m[n], s[n], g, k)
      d = d + (wd * w[n] if w[n].ndim > 1 else 0.0)  # decoupled, as AdamW
      new_w[n] = w[n] - kappa * lr * (d + (0.0 if through else c))
    for n in v:
      c = (w[n] - gam[n]) / nu
      v[n] = v[n] + lr * (np_adam(dm[n], ds[n], c, k) if dual else c)
    gam = np_prox_all(v, kappa)
    w = new_w
    hist.append(({n: x.copy() for n, x in w.items()}, dict(v), dict(gam)))
  return hist


@pytest.mark.parametrize("coupling, dual", [("outside", False), ("momentum", False),
                                           ("momentum", True)], ids=["outside", "through",
                                                                     "through-dual"])
@pytest.mark.parametrize("store_gamma", [True, False], ids=["stored", "lean"])
def test_adam_direction_matches_numpy(store_gamma, coupling, dual, update_form):
  w0, coef, target = _problem(2)
  tx = sl.splitlbi(0.05, kappa=2.0, nu=2.0, weight_decay=0.01, penalty=_penalty(),
                   direction=optax.scale_by_adam(), store_gamma=store_gamma,
                   xla_cpu_form=update_form, coupling=coupling,
                   dual_direction=optax.scale_by_adam() if dual else None)
  got = _run_jax(tx, w0, coef, target, 15)
  ref = np_run_adam(w0, coef, target, 15, lr=0.05, kappa=2.0, nu=2.0, wd=0.01,
                    through=coupling == "momentum", dual=dual)
  for (params, state), (w_ref, v_ref, g_ref) in zip(got, ref):
    gamma = sl.gamma(state)
    for n in SHAPES:
      np.testing.assert_allclose(_get(params, n), w_ref[n], rtol=2e-4, atol=2e-5, err_msg=n)
      if n in v_ref:
        np.testing.assert_allclose(_get(gamma, n), g_ref[n], rtol=2e-4, atol=2e-5, err_msg=n)
  nz = [np.mean(r[2]["conv/kernel"] != 0) for r in ref]  # the path passes a partial support
  assert any(0 < x < 1 for x in nz), nz


@pytest.mark.parametrize("coupling", ["outside", "momentum"], ids=["outside", "through"])
@pytest.mark.parametrize("store_gamma", [True, False], ids=["stored", "lean"])
def test_adam_direction_updates_the_donated_buffers_in_place(store_gamma, coupling):
  """XLA:CPU, default form: a donated update with an Adam direction copies no more
  parameter-sized arrays than the paper's update (none with Γ stored; it copied 6-8
  per leaf when the unused momentum buffer was rewritten with d and (W − Γ)/ν was
  recomputed outside a buffer of its own); and with a direction the state keeps no
  momentum buffer."""
  w0, coef, _ = _problem(4)
  params, grads = _tree(w0), _tree(coef)

  def compiled(tx):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    f = jax.jit(step, donate_argnums=(0, 1))
    hlo = f.lower(params, tx.init(params), grads).compile().as_text()
    return f, re.findall(r"= f32\[\d+,[^\]]*\]\S* copy\((\S+)\)", hlo[hlo.index("ENTRY"):])

  kw = dict(nu=2.0, penalty=_penalty(), store_gamma=store_gamma)
  tx = sl.splitlbi(0.05, **kw, direction=optax.scale_by_adam(), coupling=coupling)
  f, copies = compiled(tx)
  _, paper_copies = compiled(sl.splitlbi(0.05, **kw))
  assert copies == paper_copies
  assert copies == ([] if store_gamma else ["%s_v__out____kernel__.1"])  # a norm-only V
  p, s = _tree(w0), tx.init(params)
  for _ in range(3):
    p, s = f(p, s, grads)
  assert jax.tree.leaves(s.momentum) == []  # no momentum buffer with a direction: shapes
  assert jax.tree.structure(params).flatten_up_to(s.momentum) == [
      sl.ParamShape(x.shape, x.dtype) for x in jax.tree.leaves(params)]
  assert np.any(np.asarray(s.v["conv"]["kernel"]))


def test_a_nu_schedule_under_inject_hyperparams_matches_numpy():
  """ν as a function of the step (``optax.inject_hyperparams``), here the coupling off
  (ν = 10⁹) for 5 steps and then ν = 2, through Adam with the dual Adam."""
  w0, coef, target = _problem(3)
  nu = lambda count: 1e9 if count < 5 else 2.0  # noqa: E731
  tx = optax.inject_hyperparams(
      sl.splitlbi, static_args=("penalty", "direction", "dual_direction", "coupling"))(
          0.05, kappa=2.0, nu=lambda c: jnp.where(c < 5, 1e9, 2.0), weight_decay=0.01,
          penalty=_penalty(), direction=optax.scale_by_adam(), coupling="momentum",
          dual_direction=optax.scale_by_adam())
  got = _run_jax(tx, w0, coef, target, 12)
  ref = np_run_adam(w0, coef, target, 12, lr=0.05, kappa=2.0, nu=nu, wd=0.01, through=True,
                    dual=True)
  for (params, state), (w_ref, _, g_ref) in zip(got, ref):
    for n in SHAPES:
      np.testing.assert_allclose(_get(params, n), w_ref[n], rtol=2e-4, atol=2e-5, err_msg=n)
      if n in g_ref:
        np.testing.assert_allclose(_get(sl.gamma(state), n), g_ref[n], rtol=2e-4, atol=2e-5,
                                   err_msg=n)
  const = np_run_adam(w0, coef, target, 12, lr=0.05, kappa=2.0, nu=2.0, wd=0.01, through=True,
                      dual=True)
  assert not np.allclose(const[-1][0]["conv/kernel"], ref[-1][0]["conv/kernel"], atol=1e-3)


def test_direction_argument_errors():
  with pytest.raises(ValueError, match="direction must be an optax"):
    sl.splitlbi(0.1, direction="adam")
  with pytest.raises(ValueError, match="dual_direction must be an optax"):
    sl.splitlbi(0.1, dual_direction="adam")
  with pytest.raises(ValueError, match="nesterov"):
    sl.splitlbi(0.1, direction=optax.scale_by_adam(), nesterov=True)
  with pytest.raises(ValueError, match="coupling must be 'outside' or 'momentum'"):
    sl.splitlbi(0.1, direction=optax.scale_by_adam(), coupling="direction")
