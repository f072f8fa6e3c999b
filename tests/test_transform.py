"""The SplitLBI transform against an independent NumPy implementation and the paper's limits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as sl

# ---------------------------------------------------------------------------
# An independent NumPy (float64) implementation of the update equations.
# ---------------------------------------------------------------------------

SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
          "dense": {"kernel": (6, 3), "bias": (3,)}}
NAMES = [("conv", "kernel"), ("conv", "bias"), ("dense", "kernel"), ("dense", "bias")]


def _np_prox(v, kind, t):
  if kind is None:
    return None
  if kind == "lasso":
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)
  norm = np.sqrt(np.sum(v * v, axis=(0, 1, 2), keepdims=True))  # one group per filter
  with np.errstate(divide="ignore", invalid="ignore"):
    scale = np.where(norm > t, 1.0 - t / np.where(norm > 0, norm, 1.0), 0.0)
  return scale * v


def np_splitlbi(w0, grad_fn, steps, *, lr, kappa, nu, lam, tau, nesterov, wd, wd_mask,
                kinds, coupling):
  """Runs SplitLBI in NumPy. ``kinds[name] = (kind, threshold)``; returns W, V, Γ per step."""
  w = {k: v.astype(np.float64) for k, v in w0.items()}
  b = {k: np.zeros_like(x) for k, x in w.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  gam = {k: np.zeros_like(x) for k, x in w.items()}
  history = []
  for k in range(steps):
    alpha = lr(k)
    g = grad_fn(w)
    new_w, new_v, new_gam = {}, {}, {}
    for name in w:
      kind, t = kinds[name]
      gt = g[name] + (wd * w[name] if wd_mask[name] else 0.0)
      c = (w[name] - gam[name]) / nu if kind else 0.0
      if coupling == "momentum":
        gt = gt + c
      b[name] = tau * b[name] + gt
      d = gt + tau * b[name] if nesterov else b[name]
      if coupling == "outside":
        d = d + c
      new_w[name] = w[name] - kappa * alpha * d
      if kind:
        new_v[name] = v[name] - (alpha / nu) * (gam[name] - w[name])
        new_gam[name] = kappa * _np_prox(new_v[name], kind, t)
    w = new_w
    v.update(new_v)
    gam.update(new_gam)
    history.append(({n: x.copy() for n, x in w.items()}, dict(v), dict(gam)))
  return history


def _make_problem(seed=0):
  rng = np.random.default_rng(seed)
  w0, coef, target = {}, {}, {}
  for mod, leaf in NAMES:
    shape = SHAPES[mod][leaf]
    scale = np.array([0.05, 0.4, 1.0, 2.0])[: shape[-1]]  # separated filter / column scales
    w0[(mod, leaf)] = rng.normal(size=shape) * scale
    coef[(mod, leaf)] = rng.uniform(0.5, 1.5, size=shape)
    target[(mod, leaf)] = rng.normal(size=shape) * scale * 2
  return w0, coef, target


def _to_tree(flat, dtype=jnp.float32):
  tree = {}
  for (mod, leaf), x in flat.items():
    tree.setdefault(mod, {})[leaf] = jnp.asarray(x, dtype)
  return tree


def _from_tree(tree):
  return {(mod, leaf): np.asarray(tree[mod][leaf], np.float64) for mod, leaf in NAMES}


def _run_jax(tx, w0, coef, target, steps):
  params = _to_tree(w0)
  c, t = _to_tree(coef), _to_tree(target)

  def loss(p):  # L(W) = Σ ½ c (W − t)², ∇L = c (W − t)
    return sum(jnp.sum(0.5 * ci * (pi - ti) ** 2)
               for ci, pi, ti in zip(jax.tree.leaves(c), jax.tree.leaves(p), jax.tree.leaves(t)))

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


DEFAULT_KINDS = {("conv", "kernel"): ("group", 0.5), ("conv", "bias"): (None, 0),
                 ("dense", "kernel"): ("lasso", 0.5), ("dense", "bias"): (None, 0)}
NDIM_GT1 = {n: len(SHAPES[n[0]][n[1]]) > 1 for n in NAMES}

CASES = {
    "default": dict(),
    "naive": dict(momentum=0.0),
    "nesterov": dict(nesterov=True),
    "weight_decay": dict(weight_decay=0.05),
    "weight_decay_mask": dict(weight_decay=0.05,
                              weight_decay_mask={"conv": {"kernel": False, "bias": True},
                                                 "dense": {"kernel": True, "bias": False}}),
    "weight_decay_mask_prefix": dict(weight_decay=0.05,
                                     weight_decay_mask={"conv": False, "dense": True}),
    "coupling_momentum": dict(coupling="momentum"),
    "nesterov_momentum_wd": dict(nesterov=True, coupling="momentum", weight_decay=0.01),
    "kappa2": dict(kappa=2.0, learning_rate=0.05),
    "normalized_groups": dict(penalty=sl.by_ndim({4: sl.conv_filters(lam=0.2, normalized=True),
                                                  2: sl.Lasso(0.3)})),
    "schedule": dict(learning_rate=optax.piecewise_constant_schedule(0.1, {7: 0.5, 15: 0.2})),
}


@pytest.mark.parametrize("store_gamma", [True, False], ids=["stored", "lean"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference(case, store_gamma, update_form):
  opts = dict(learning_rate=0.1, kappa=1.0, nu=2.0, lam=0.5, momentum=0.9)
  opts.update(CASES[case])
  steps = 25
  w0, coef, target = _make_problem()
  jax_hist = _run_jax(sl.splitlbi(**opts, store_gamma=store_gamma, xla_cpu_form=update_form),
                      w0, coef, target, steps)

  lr = opts["learning_rate"]
  kinds = dict(DEFAULT_KINDS)
  if case == "normalized_groups":
    kinds[("conv", "kernel")] = ("group", 0.2 * math.sqrt(3 * 3 * 2))
    kinds[("dense", "kernel")] = ("lasso", 0.3)
  wd_mask = NDIM_GT1
  if "weight_decay_mask" in opts:
    m = opts["weight_decay_mask"]
    wd_mask = {n: m[n[0]] if isinstance(m[n[0]], bool) else m[n[0]][n[1]] for n in NAMES}
  ref_hist = np_splitlbi(
      w0, lambda w: {n: coef[n] * (w[n] - target[n]) for n in w}, steps,
      lr=(lambda k: float(lr(k))) if callable(lr) else (lambda k: lr),
      kappa=opts["kappa"], nu=opts["nu"], lam=opts["lam"], tau=opts["momentum"],
      nesterov=opts.get("nesterov", False), wd=opts.get("weight_decay", 0.0),
      wd_mask=wd_mask, kinds=kinds, coupling=opts.get("coupling", "outside"))

  for (params, state), (w_ref, v_ref, g_ref) in zip(jax_hist, ref_hist):
    w = _from_tree(params)
    for n in NAMES:
      np.testing.assert_allclose(w[n], w_ref[n], rtol=2e-4, atol=2e-5, err_msg=f"W {n}")
    for n in [("conv", "kernel"), ("dense", "kernel")]:
      np.testing.assert_allclose(np.asarray(state.v[n[0]][n[1]]), v_ref[n],
                                 rtol=2e-4, atol=2e-5, err_msg=f"V {n}")
      gamma = state.gamma if store_gamma else sl.gamma(state)
      np.testing.assert_allclose(np.asarray(gamma[n[0]][n[1]]), g_ref[n],
                                 rtol=2e-4, atol=2e-5, err_msg=f"Γ {n}")
  # The run must exercise both sides of the prox: some groups/entries in, some out.
  final_gamma = ref_hist[-1][2]
  for n in [("conv", "kernel"), ("dense", "kernel")]:
    nz = np.mean(final_gamma[n] != 0)
    assert 0 < nz < 1, (case, n, nz)


def test_state_layout_and_penalty_resolution():
  params = _to_tree(_make_problem()[0])
  state = sl.splitlbi(0.1).init(params)
  assert isinstance(state.v["conv"]["bias"], optax.MaskedNode)
  assert isinstance(state.gamma["dense"]["bias"], optax.MaskedNode)
  assert state.momentum["conv"]["bias"].shape == (4,)
  assert state.penalty["conv"]["kernel"].reduce_axes == (0, 1, 2)
  assert state.penalty["dense"]["kernel"].kind == "lasso"
  assert state.penalty["dense"]["bias"] is None
  assert state.entry is None and state.count.dtype == jnp.int32


def test_nu_to_infinity_is_sgd_with_step_kappa_alpha():
  w0, coef, target = _make_problem(1)
  tx = sl.splitlbi(0.05, kappa=2.0, nu=1e30, lam=0.5, momentum=0.9)
  hist = _run_jax(tx, w0, coef, target, 20)
  sgd_hist = _run_jax(optax.sgd(0.1, momentum=0.9), w0, coef, target, 20)
  for (p, _), (q, _) in zip(hist, sgd_hist):
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # f32 round-off only


def test_gamma_zero_until_group_norm_exceeds_lambda():
  w0, coef, target = _make_problem(2)
  lam = 1.5
  hist = _run_jax(sl.splitlbi(0.1, nu=5.0, lam=lam), w0, coef, target, 40)
  entered_at = {}
  for k, (_, state) in enumerate(hist):
    v = np.asarray(state.v["conv"]["kernel"])
    g = np.asarray(state.gamma["conv"]["kernel"])
    norms = np.sqrt((v ** 2).sum(axis=(0, 1, 2)))
    for j in range(4):
      if norms[j] <= lam:
        assert np.all(g[..., j] == 0), (k, j)
      else:
        assert np.all(g[..., j] != 0), (k, j)
        entered_at.setdefault(j, k)
    vd = np.asarray(state.v["dense"]["kernel"])
    gd = np.asarray(state.gamma["dense"]["kernel"])
    np.testing.assert_array_equal(gd == 0, np.abs(vd) <= lam)
  assert hist[0][1].gamma["conv"]["kernel"].any() == False  # noqa: E712  V₁ is small
  assert 0 < len(entered_at) < 4, entered_at  # some filters entered, not all


def test_convergence_theorem1_least_squares():
  """Theorem 1: for a small enough α, L̄ settles and ∇L(W) → 0.

  The paper states α < 2/(κ(Lip + 1/ν)). That bound is not sufficient: W and
  Γ both move by κα·∇L̄, whose Hessian has eigenvalues up to Lip + 2/ν (at 0.9×
  the paper's bound this problem diverges). We use α = 0.9·2/(κ(Lip + 2/ν)).
  """
  rng = np.random.default_rng(0)
  n, p = 80, 10
  x = rng.normal(size=(n, p))
  y = x @ rng.normal(size=p) + 0.1 * rng.normal(size=n)
  lip = np.linalg.eigvalsh(x.T @ x / n).max()
  kappa, nu = 2.0, 1.0
  alpha = 0.9 * 2 / (kappa * (lip + 2 / nu))
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(w):
    return 0.5 * jnp.mean((xj @ w - yj) ** 2)

  tx = sl.splitlbi(alpha, kappa=kappa, nu=nu, lam=0.1, momentum=0.0, penalty="lasso")
  w = jnp.zeros(p)
  state = tx.init(w)

  @jax.jit
  def step(w, s):
    u, s = tx.update(jax.grad(loss)(w), s, w)
    return optax.apply_updates(w, u), s

  lbar = []
  for _ in range(3000):
    w, state = step(w, state)
    lbar.append(float(loss(w) + jnp.sum((w - state.gamma) ** 2) / (2 * nu)))
  grad = np.asarray(jax.grad(loss)(w))
  grad0 = np.asarray(jax.grad(loss)(jnp.zeros(p)))
  assert np.linalg.norm(grad) < 1e-4 * np.linalg.norm(grad0), np.linalg.norm(grad)
  assert abs(lbar[-1] - lbar[-500]) < 1e-6
  # At the limit W = Γ (V stops moving) and W solves least squares.
  np.testing.assert_allclose(np.asarray(w), np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-3)


def test_inverse_scale_space_true_variables_enter_first():
  rng = np.random.default_rng(3)
  n, p, s = 200, 1000, 10
  x = rng.normal(size=(n, p))
  beta = np.zeros(p)
  true = rng.choice(p, s, replace=False)
  beta[true] = rng.choice([-1, 1], s) * rng.uniform(2, 3, s)
  y = x @ beta + 0.1 * rng.normal(size=n)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(w):
    return 0.5 * jnp.mean((xj @ w - yj) ** 2)

  tx = sl.splitlbi(0.01, kappa=10.0, nu=1.0, lam=1.0, momentum=0.0, penalty="lasso",
                   record_path=True)
  w = jnp.zeros(p)
  state = tx.init(w)

  @jax.jit
  def run(w, s):
    def body(carry, _):
      w, s = carry
      u, s = tx.update(jax.grad(loss)(w), s, w)
      return (optax.apply_updates(w, u), s), None
    return jax.lax.scan(body, (w, s), None, length=1500)[0]

  w, state = run(w, state)
  entry = np.asarray(state.entry)
  entry = np.where(entry < 0, np.iinfo(np.int32).max, entry)
  false = np.setdiff1d(np.arange(p), true)
  assert np.all(entry[true] < np.iinfo(np.int32).max), "all true variables entered"
  assert entry[true].max() < entry[false].min(), (entry[true], entry[false].min())


# ---------------------------------------------------------------------------
# optax citizenship
# ---------------------------------------------------------------------------


def _small():
  params = _to_tree(_make_problem(4)[0])
  grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
  return params, grads


def test_jit_does_not_recompile_and_chain_works():
  params, grads = _small()
  tx = optax.chain(optax.clip_by_global_norm(10.0), sl.splitlbi(0.1, nu=2.0))
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1
  assert int(sl.find_state(state).count) == 3


def test_donated_params_and_state():
  params, grads = _small()
  tx = sl.splitlbi(0.1, nu=2.0, record_path=True)
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda us: (optax.apply_updates(p, us[0]), us[1]))(
      tx.update(grads, s, p)), donate_argnums=(0, 1))
  for _ in range(3):
    params, state = step(params, state)
  assert np.isfinite(np.asarray(state.v["conv"]["kernel"])).all()


def test_inject_hyperparams_matches_plain():
  params, grads = _small()
  kw = dict(learning_rate=0.1, kappa=1.5, nu=2.0, lam=0.3, momentum=0.8, weight_decay=1e-3)
  plain = sl.splitlbi(**kw)
  injected = optax.inject_hyperparams(sl.splitlbi)(**kw)
  s1, s2 = plain.init(params), injected.init(params)
  p1 = p2 = params
  for _ in range(10):
    u1, s1 = plain.update(grads, s1, p1)
    u2, s2 = jax.jit(injected.update)(grads, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves((p1, s1.v, s1.gamma, s1.momentum)),
                  jax.tree.leaves((p2, s2.inner_state.v, s2.inner_state.gamma,
                                   s2.inner_state.momentum))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert sl.support(s2)["conv"]["kernel"].shape == (3, 3, 2, 4)


def test_multisteps_accumulates_gradients():
  params, _ = _small()
  g1 = jax.tree.map(lambda p: 0.3 * p, params)
  g2 = jax.tree.map(lambda p: -0.1 * p + 0.2, params)
  multi = optax.MultiSteps(sl.splitlbi(0.1, nu=2.0), every_k_schedule=2)
  plain = sl.splitlbi(0.1, nu=2.0)
  ms, ps = multi.init(params), plain.init(params)
  u, ms = multi.update(g1, ms, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  u, ms = multi.update(g2, ms, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  u_ref, ps = plain.update(mean, ps, params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_map_params_does_not_inspect_leaves():
  params, _ = _small()
  tx = sl.splitlbi(0.1, record_path=True)
  state = tx.init(params)
  specs = optax.tree.map_params(tx, lambda p: "spec", state,
                                transform_non_params=lambda _: "other")
  assert specs.momentum["conv"]["kernel"] == "spec"
  assert specs.v["dense"]["kernel"] == "spec"
  assert specs.count == "other"
  # With a direction there is no b: no spec to give (a sharding for a missing array).
  tx = sl.splitlbi(0.1, direction=optax.scale_by_adam())
  specs = optax.tree.map_params(tx, lambda p: "spec", tx.init(params),
                                transform_non_params=lambda _: "other")
  assert specs.momentum["conv"]["kernel"] == sl.ParamShape((3, 3, 2, 4), jnp.float32)
  assert specs.v["dense"]["kernel"] == "spec" and specs.direction.mu["conv"]["bias"] == "spec"


def test_extra_args_are_ignored():
  params, grads = _small()
  tx = sl.splitlbi(0.1)
  u, _ = tx.update(grads, tx.init(params), params, loss=jnp.ones(()), rng=None)
  assert jax.tree.structure(u) == jax.tree.structure(params)


@pytest.mark.parametrize("state_dtype", [None, jnp.float32])
def test_bf16_params_stay_bf16(state_dtype):
  params, grads = _small()
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
  tx = sl.splitlbi(0.1, nu=2.0, state_dtype=state_dtype)
  state = tx.init(params)
  for _ in range(3):
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  want = jnp.bfloat16 if state_dtype is None else jnp.float32
  assert all(x.dtype == want for x in jax.tree.leaves((state.v, state.gamma, state.momentum)))


def test_linen_train_state_and_nnx_optimizer():
  from flax import linen as nn
  from flax import nnx
  from flax.training import train_state

  x = jnp.ones((2, 8, 8, 1))
  model = nn.Sequential([nn.Conv(4, (3, 3)), lambda y: y.reshape(y.shape[0], -1), nn.Dense(3)])
  params = model.init(jax.random.key(0), x)["params"]
  ts = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=sl.splitlbi(0.1, nu=1.0, lam=0.01))
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(ts.params)
  ts = ts.apply_gradients(grads=grads)
  assert sl.support(ts.opt_state)["layers_0"]["kernel"].shape == (3, 3, 1, 4)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.fc = nnx.Linear(4 * 64, 3, rngs=rngs)

    def __call__(self, y):
      return self.fc(self.conv(y).reshape(y.shape[0], -1))

  net = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(net, sl.splitlbi(0.1, nu=1.0, lam=0.01), wrt=nnx.Param)
  before = np.asarray(net.conv.kernel[...]).copy()
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(net)
  opt.update(net, grads)
  assert not np.allclose(before, np.asarray(net.conv.kernel[...]))
  inner = sl.find_state(opt.opt_state)
  assert inner.penalty["conv"]["kernel"].kind == "group"


# ---------------------------------------------------------------------------
# Errors and edge cases
# ---------------------------------------------------------------------------


def test_bad_weight_decay_mask_raises():
  params, grads = _small()
  tx = sl.splitlbi(0.1, weight_decay=0.1, weight_decay_mask={"conv": True, "nope": False})
  with pytest.raises(ValueError, match="weight_decay_mask"):
    tx.update(grads, tx.init(params), params)


def test_update_without_params_raises():
  params, grads = _small()
  tx = sl.splitlbi(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params))


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate="0.1"), "learning_rate"), (dict(learning_rate=None), "learning_rate"),
    (dict(learning_rate=[0.1]), "learning_rate"), (dict(learning_rate=-0.1), "learning_rate"),
    (dict(kappa="1"), "kappa"), (dict(kappa=0.0), "kappa"), (dict(kappa=-1.0), "kappa"), (dict(nu=0.0), "nu"),
    (dict(lam=-0.1), "lam"), (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(coupling="inside"), "coupling"), (dict(nu=float("nan")), "nu"),
])
def test_invalid_hyperparameters_raise(kwargs, name):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=f"splitlbi: {name}"):
    sl.splitlbi(**kwargs)


def test_mismatched_trees_and_shapes_name_the_argument_and_leaf():
  params, grads = _small()
  tx = sl.splitlbi(0.1)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"splitlbi: grads \(updates\) and params have "
                                       "different tree structures"):
    tx.update({"conv": grads["conv"]}, state, params)
  bad = {**grads, "conv": {**grads["conv"], "kernel": jnp.zeros((3, 3, 2, 5))}}
  with pytest.raises(ValueError, match=r"'conv/kernel' has shape \(3, 3, 2, 5\) in grads"):
    tx.update(bad, state, params)
  other = {"conv": params["conv"], "dense2": params["dense"]}
  with pytest.raises(ValueError, match="state.momentum and params have different tree"):
    tx.update(jax.tree.map(jnp.zeros_like, other), state, other)
  wider = {**params, "dense": {**params["dense"], "kernel": jnp.zeros((6, 5))}}
  with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(6, 3\) in state.momentum"):
    tx.update(jax.tree.map(jnp.zeros_like, wider), state, wider)
  lasso_state = sl.splitlbi(0.1, penalty="lasso").init(params)
  with pytest.raises(ValueError, match="'conv/bias'.*penalty layout"):
    tx.update(grads, lasso_state, params)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_])
def test_penalized_leaf_must_be_real_floating(dtype):
  params = {"w": jnp.zeros((4, 3), dtype), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match="splitlbi: params leaf 'w' has dtype"):
    sl.splitlbi(0.1).init(params)
  # Unpenalized, the same leaf is accepted by init.
  sl.splitlbi(0.1, penalty={"w": None, "b": None}).init(params)


@pytest.mark.parametrize("penalty, leaf", [
    ({"conv": {"kernel": "group", "bias": "group"}, "dense": None}, "conv/bias"),
    ({"conv": None, "dense": {"kernel": sl.GroupLasso((2,)), "bias": None}}, "dense/kernel"),
    ({"conv": "lassoo", "dense": None}, "conv/"),
])
def test_penalty_that_does_not_fit_names_the_leaf(penalty, leaf):
  params, _ = _small()
  with pytest.raises(ValueError, match=leaf):
    sl.splitlbi(0.1, penalty=penalty).init(params)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_zero_groups_give_exact_zero_never_nan(lam):
  params = {"k": jnp.zeros((3, 3, 2, 4)).at[..., 0].set(1.0)}
  grads = {"k": jnp.zeros((3, 3, 2, 4))}
  tx = sl.splitlbi(0.1, nu=0.1, lam=lam, record_path=True)
  state = tx.init(params)
  for _ in range(5):
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
  g = np.asarray(state.gamma["k"])
  assert np.isfinite(g).all() and np.isfinite(np.asarray(params["k"])).all()
  assert np.all(g[..., 1:] == 0) and np.all(g[..., 0] != 0)
  np.testing.assert_array_equal(np.asarray(state.entry["k"]).ravel() > 0, [True, False, False, False])
