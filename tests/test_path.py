"""The regularization path: entry steps, importance order, pruning to a target density.

Entry order on orthogonal-design sparse regression (derivation)
---------------------------------------------------------------
With L(w) = ‖Xw − y‖²/(2n), y = Xw*, XᵀX = n·I, the gradient is ∇L = w − w*:
coordinates (or groups of coordinates) decouple. Before a coordinate i enters
supp(Γ) its Γᵢ = 0, so its SplitLBI recursion (b₀ = w₀ = V₀ = 0)::

    bᵢ' = τ·bᵢ + (wᵢ − w*ᵢ)
    wᵢ' = wᵢ − κα·bᵢ' − (κα/ν)·wᵢ
    Vᵢ' = Vᵢ + (α/ν)·wᵢ

is linear in w*ᵢ with zero start: wᵢ,ₖ = cₖ·w*ᵢ, Vᵢ,ₖ = dₖ·w*ᵢ, where the
scalars (cₖ, dₖ) follow the same recursion with w* = 1 and do not depend on i.
Coordinate i enters at the first k with |Vᵢ,ₖ| = |w*ᵢ|·dₖ > λ. When every cₖ > 0
(checked below), dₖ = (α/ν)Σ_{j<k} cⱼ increases strictly, so the entry step is
a non-increasing function of |w*ᵢ|: larger true coefficients enter first and
w*ᵢ = 0 never enters. For a group lasso with groups of columns the same holds
with ‖W*_g‖₂ in place of |w*ᵢ| (the prox only sees ‖V_g‖ = ‖W*_g‖·dₖ).
The test computes cₖ, dₖ in float64 NumPy and predicts the exact entry steps.
"""

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as osl

KAPPA, ALPHA, NU, LAM, TAU = 1.0, 0.1, 1.0, 1.0, 0.5
STEPS = 60


def _orthogonal_design(n, d, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, d)))
  return (np.sqrt(n) * q).astype(np.float32)  # XᵀX = n·I


def _reference_d(steps):
  """dₖ (k = 1..steps) of the scalar pre-entry recursion with w* = 1, float64."""
  c = b = d = 0.0
  out = []
  for k in range(steps):
    b = TAU * b + (c - 1.0)
    c, d = c - KAPPA * ALPHA * b - KAPPA * ALPHA / NU * c, d + ALPHA / NU * c
    assert k == 0 or c > 0  # the derivation's condition: dₖ strictly increasing
    out.append(d)
  return np.array(out)


def _predicted_entry(magnitudes, steps):
  d = _reference_d(steps)
  out = []
  for m in magnitudes:
    hit = np.nonzero(m * d > LAM)[0]
    if len(hit):  # keep away from float32 round-off at the crossing
      assert min(abs(m * d - LAM)) > 1e-3
    out.append(int(hit[0]) + 1 if len(hit) else -1)
  return np.array(out)


def _run(w0, loss, penalty):
  opt = osl.splitlbi(ALPHA, kappa=KAPPA, nu=NU, lam=LAM, momentum=TAU, penalty=penalty,
                     record_path=True)
  params = {"w": w0}

  def step(carry, _):
    p, s = carry
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=STEPS))(
      (params, opt.init(params)))
  return params, state


def test_entry_order_orthogonal_lasso():
  n, d = 32, 8
  x = _orthogonal_design(n, d, 1)
  w_star = np.array([3.0, -2.2, 1.7, 0.0, -1.3, 1.0, 0.6, 0.0], np.float32)
  y = x @ w_star
  params, state = _run(jnp.zeros(d), lambda p: jnp.sum((x @ p["w"] - y) ** 2) / (2 * n),
                       osl.Lasso())
  entry = np.asarray(osl.entry_steps(state)["w"])
  want = _predicted_entry(np.abs(w_star), STEPS)
  np.testing.assert_array_equal(want, [9, 11, 13, -1, 16, 19, 29, -1])  # hand-checked
  np.testing.assert_array_equal(entry, want)
  # Importance: by |w*| descending; the two zeros last.
  ranks = np.asarray(osl.importance_ranks(state, scope="layer")["w"])
  np.testing.assert_array_equal(np.argsort(ranks)[:6], [0, 1, 2, 4, 5, 6])
  # Three of eight coordinates: the three largest |w*|.
  m = osl.prune_to_sparsity(params, state, 3 / 8)["w"]
  np.testing.assert_array_equal(m, [True, True, True] + [False] * 5)
  # The subnetwork at step 15 holds the coordinates that entered by then.
  np.testing.assert_array_equal(osl.entered_by(state, 15)["w"],
                                [True, True, True] + [False] * 5)


def test_entry_order_orthogonal_group_neurons():
  n, d_in, d_out = 16, 4, 5
  x = _orthogonal_design(n, d_in, 2)
  w_star = np.zeros((d_in, d_out), np.float32)
  w_star[:, 0] = [1.0, -1.0, 0.5, 0.0]     # ‖·‖ = 1.5
  w_star[:, 1] = [0.0, 2.0, 0.0, 0.0]      # 2.0
  w_star[:, 3] = [0.3, 0.4, 0.0, 0.0]      # 0.5
  w_star[:, 4] = [-1.2, 0.0, 0.0, 1.6]     # 2.0: ties with column 1
  y = x @ w_star
  _, state = _run(jnp.zeros((d_in, d_out)),
                  lambda p: jnp.sum((x @ p["w"] - y) ** 2) / (2 * n), osl.dense_neurons())
  entry = np.asarray(osl.entry_steps(state)["w"])
  assert entry.shape == (1, d_out)  # keepdims layout
  want = _predicted_entry(np.linalg.norm(w_star, axis=0), STEPS)
  np.testing.assert_array_equal(entry[0], want)
  assert want[1] == want[4] < want[0] < want[3] and want[2] == -1
  # Layer-level pruning to 2 of 5 neurons keeps the two largest columns.
  m = osl.prune_to_sparsity(None, state, 0.4)["w"]
  np.testing.assert_array_equal(m[0], [False, True, False, False, True])
  assert m.shape == (d_in, d_out) and m.all(axis=0).sum() == 2


# ---- pruning exactness on a hand-built state --------------------------------------------

CONV_ENTRY = np.array([3, -1, 1, 1, 7], np.int32)        # 5 filters of 2 weights
CONV_V = np.array([0.5, 0.9, 2.0, 3.0, 1.5])             # filter norms of V
DENSE_ENTRY = np.array([[4, 5, -1, 6, 8], [9, 10, -1, 12, 13],
                        [14, 15, 16, 17, 18], [-1, 20, 21, 22, 23]], np.int32)
DENSE_V = np.arange(20, dtype=np.float32).reshape(4, 5) / 40 + 0.1


def _hand_state(record_path=True):
  params = {"conv": jnp.zeros((1, 1, 2, 5)), "dense": jnp.zeros((4, 5)), "b": jnp.zeros(5)}
  s = osl.splitlbi(0.1, record_path=record_path).init(params)
  v_conv = np.zeros((1, 1, 2, 5), np.float32)
  v_conv[0, 0, 0] = CONV_V  # one nonzero entry per filter: ‖V_g‖ = CONV_V
  s = s._replace(v={"conv": jnp.asarray(v_conv), "dense": jnp.asarray(DENSE_V),
                    "b": optax.MaskedNode()})
  if record_path:
    s = s._replace(entry={"conv": jnp.asarray(CONV_ENTRY.reshape(1, 1, 1, 5)),
                          "dense": jnp.asarray(DENSE_ENTRY), "b": optax.MaskedNode()})
  return params, s


def _nearest_count(target, sizes_in_order):
  """Independent reference: prefix length whose weight count is nearest target·N."""
  total = sum(sizes_in_order)
  cums = np.concatenate([[0], np.cumsum(sizes_in_order)])
  goal = fractions.Fraction(target).limit_denominator(10**6) * total
  errs = [abs(fractions.Fraction(int(c)) - goal) for c in cums]
  return int(np.argmin(errs))  # first minimum: fewer on ties


def test_prune_per_layer_exact_group_counts():
  params, s = _hand_state()
  # Hand order of conv filters: entry 1 (ties: ‖V‖ 3.0 > 2.0) → 3, 2; then 0 (3), 4 (7), 1 (never).
  conv_order = [3, 2, 0, 4, 1]
  for target, k in [(0.0, 0), (0.2, 1), (0.4, 2), (0.5, 2), (0.55, 3), (0.7, 3), (0.9, 4),
                    (0.95, 5), (1.0, 5)]:
    m = osl.prune_to_sparsity(params, s, target, scope="layer")
    kept = np.asarray(m["conv"][0, 0, 0])
    np.testing.assert_array_equal(np.asarray(m["conv"][0, 0, 1]), kept)  # whole filters
    assert sorted(np.nonzero(kept)[0]) == sorted(conv_order[:k]), target
    dense = np.asarray(m["dense"])
    assert dense.sum() == _nearest_count(target, [1] * 20), target
    # Dense: distinct entry steps, then the never-entered (flat 2, 7, 15) by |V| (15, 7, 2).
    entered = [i for i in np.argsort(DENSE_ENTRY.ravel()) if DENSE_ENTRY.ravel()[i] >= 0]
    dense_order = entered + [15, 7, 2]
    assert set(np.nonzero(dense.ravel())[0]) == set(dense_order[:dense.sum()]), target
    assert m["b"] is None


def test_prune_global_nearest_weight_count_and_nested():
  params, s = _hand_state()
  # Global order by entry step (the conv filter ties broken by ‖V‖/λ as above); the
  # never-entered (conv 1, dense (0,2), (1,2), (3,0)) last by ‖V‖/λ.
  items = [(e, -v, ("conv", g)) for g, (e, v) in enumerate(zip(CONV_ENTRY, CONV_V))]
  items += [(e, -v, ("dense", i)) for i, (e, v) in enumerate(zip(DENSE_ENTRY.ravel(),
                                                                  DENSE_V.ravel()))]
  items = sorted(items, key=lambda t: (t[0] if t[0] >= 0 else 10**9, t[1]))
  sizes = [2 if name == "conv" else 1 for _, _, (name, _) in items]
  prev = None
  for target in [0.0, 0.1, 4 / 30, 0.25, 1 / 3, 0.5, 0.77, 0.9, 1.0]:
    m = osl.prune_to_sparsity(params, s, target, scope="global")
    p = _nearest_count(target, sizes)
    want_conv = np.zeros(5, bool)
    want_dense = np.zeros(20, bool)
    for _, _, (name, i) in items[:p]:
      (want_conv if name == "conv" else want_dense)[i] = True
    np.testing.assert_array_equal(np.asarray(m["conv"][0, 0, 0]), want_conv, err_msg=target)
    np.testing.assert_array_equal(np.asarray(m["dense"]).ravel(), want_dense, err_msg=target)
    kept = int(np.sum(m["conv"])) + int(np.sum(m["dense"]))
    assert abs(kept - target * 30) <= 1.0  # within half of the largest group (2)
    if prev is not None:  # nested family
      assert all(np.all(np.asarray(a) <= np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(prev), jax.tree.leaves(m)))
    prev = m
  # 4/30: conv filters 2 and 3 (entry 1) then filter 0 (entry 3) cost 2+2 = 4 weights.
  m = osl.prune_to_sparsity(params, s, 4 / 30, scope="global")
  np.testing.assert_array_equal(np.asarray(m["conv"][0, 0, 0]), [0, 0, 1, 1, 0])
  assert not np.any(m["dense"])


def test_prune_under_jit_with_traced_target():
  params, s = _hand_state()
  f = jax.jit(lambda p, st, t: osl.prune_to_sparsity(p, st, t, scope="global"))
  for t in [0.25, 0.5]:
    a, b = f(params, s, t), osl.prune_to_sparsity(params, s, t, scope="global")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_global_tiebreak_compares_v_relative_to_threshold():
  # Same entry step; conv λ = 2 with ‖V‖ = 3 (ratio 1.5) beats dense λ = 1 with |V| = 1.2.
  params = {"c": jnp.zeros((1, 1, 1, 1)), "d": jnp.zeros((1, 1))}
  pen = {"c": osl.conv_filters(lam=2.0), "d": osl.Lasso()}
  s = osl.splitlbi(0.1, lam=1.0, penalty=pen, record_path=True).init(params)
  s = s._replace(v={"c": jnp.full((1, 1, 1, 1), 3.0), "d": jnp.full((1, 1), 1.2)},
                 entry={"c": jnp.full((1, 1, 1, 1), 5, jnp.int32),
                        "d": jnp.full((1, 1), 5, jnp.int32)})
  r = osl.importance_ranks(s, scope="global")
  assert int(r["c"].ravel()[0]) == 0 and int(r["d"].ravel()[0]) == 1
  s2 = s._replace(v={"c": jnp.full((1, 1, 1, 1), 2.2), "d": jnp.full((1, 1), 1.2)})
  r2 = osl.importance_ranks(s2, scope="global")  # 1.1 < 1.2: dense first
  assert int(r2["c"].ravel()[0]) == 1 and int(r2["d"].ravel()[0]) == 0


def test_without_record_path_orders_by_v():
  params, s = _hand_state(record_path=False)
  with pytest.raises(ValueError, match="record_path"):
    osl.entry_steps(s)
  m = osl.prune_to_sparsity(params, s, 0.4, scope="layer")
  # Conv by ‖V‖: 3.0 (filter 3), 2.0 (filter 2) → 2 of 5.
  np.testing.assert_array_equal(np.asarray(m["conv"][0, 0, 0]), [0, 0, 1, 1, 0])
  # Dense by |V| (increasing with the flat index): the last 8 of 20.
  np.testing.assert_array_equal(np.asarray(m["dense"]).ravel(), np.arange(20) >= 12)
  # tiebreak="w": by ‖W_g‖/√d.
  w = {"conv": jnp.asarray(np.arange(10, dtype=np.float32).reshape(1, 1, 2, 5)),
       "dense": jnp.asarray(-np.arange(20, dtype=np.float32).reshape(4, 5)), "b": jnp.zeros(5)}
  mw = osl.prune_to_sparsity(w, s, 0.2, scope="layer", tiebreak="w")
  np.testing.assert_array_equal(np.asarray(mw["conv"][0, 0, 0]), [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(np.asarray(mw["dense"]).ravel(), np.arange(20) >= 16)


def test_importance_scores_and_ranks_agree():
  _, s = _hand_state()
  sc = osl.importance_scores(s)
  r = osl.importance_ranks(s, scope="layer")
  for name in ("conv", "dense"):
    order_scores = np.argsort(-np.asarray(sc[name]).ravel(), kind="stable")
    np.testing.assert_array_equal(np.asarray(r[name]).ravel()[order_scores],
                                  np.arange(order_scores.size))
  # Entered groups outrank never-entered ones.
  conv = np.asarray(sc["conv"]).ravel()
  assert conv[1] < 1.0 <= conv.min(initial=1.0, where=CONV_ENTRY >= 0)


def test_bad_arguments():
  params, s = _hand_state()
  with pytest.raises(ValueError, match="target"):
    osl.prune_to_sparsity(params, s, 1.5)
  with pytest.raises(ValueError, match="scope"):
    osl.prune_to_sparsity(params, s, 0.5, scope="model")
  with pytest.raises(ValueError, match="tiebreak"):
    osl.importance_ranks(s, tiebreak="gamma")
  with pytest.raises(ValueError, match="params"):
    osl.prune_to_sparsity(None, s, 0.5, tiebreak="w")


def test_full_ties_fall_back_to_position():
  params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((1, 1, 1, 4))}
  s = osl.splitlbi(0.1, record_path=True).init(params)  # all −1, V = 0: complete ties
  r = osl.importance_ranks(s, scope="global")
  np.testing.assert_array_equal(r["a"], np.arange(6).reshape(3, 2))
  np.testing.assert_array_equal(r["b"].ravel(), 6 + np.arange(4))
  m = osl.prune_to_sparsity(params, s, 0.3, scope="global")  # 3 of 10 weights
  np.testing.assert_array_equal(m["a"].ravel(), [1, 1, 1, 0, 0, 0])
  assert not m["b"].any()


def test_per_layer_target_mapping():
  params, s = _hand_state()
  m = osl.prune_to_sparsity(params, s, {"conv": 0.2, "dense": 0.75})
  np.testing.assert_array_equal(np.asarray(m["conv"][0, 0, 0]), [0, 0, 0, 1, 0])  # filter 3
  assert int(np.sum(m["dense"])) == 15
  with pytest.raises(ValueError, match="missing \\['dense'\\]"):
    osl.prune_to_sparsity(params, s, {"conv": 0.2})
  with pytest.raises(ValueError, match="dense"):
    osl.prune_to_sparsity(params, s, {"conv": 0.2, "dense": 2.0})
  with pytest.raises(ValueError, match="scope='layer'"):
    osl.prune_to_sparsity(params, s, {"conv": 0.2, "dense": 0.5}, scope="global")
  with pytest.raises(ValueError, match="target"):
    osl.prune_to_sparsity(params, s, float("nan"))
