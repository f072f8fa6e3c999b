"""Sparsity reports, group norms and the coupling residue against hand counts / NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as osl

RNG = np.random.default_rng(0)
W_CONV = RNG.normal(size=(3, 3, 2, 4)).astype(np.float32)
W_DENSE = RNG.normal(size=(5, 3)).astype(np.float32)


def _params():
  return {"Conv_0": {"kernel": jnp.asarray(W_CONV), "bias": jnp.zeros(4)},
          "Dense_0": {"kernel": jnp.asarray(W_DENSE), "bias": jnp.zeros(3)}}


def _gamma():
  g_conv = np.zeros((3, 3, 2, 4), np.float32)
  g_conv[0, 2, 1, 1] = 0.5      # filter 1: one nonzero entry → whole filter in supp
  g_conv[:, :, :, 3] = -1.0     # filter 3
  g_dense = np.zeros((5, 3), np.float32)
  g_dense[[0, 1, 4, 4], [0, 2, 1, 2]] = [1.0, -2.0, 3.0, 0.1]  # 4 nonzero weights
  return g_conv, g_dense


def _state(opt=None):
  opt = opt or osl.splitlbi(0.1)
  s = opt.init(_params())
  g_conv, g_dense = _gamma()
  return s._replace(gamma={"Conv_0": {"kernel": jnp.asarray(g_conv), "bias": optax.MaskedNode()},
                           "Dense_0": {"kernel": jnp.asarray(g_dense),
                                       "bias": optax.MaskedNode()}})


# Counted by hand: conv 2 of 4 filters × 18 weights; dense 4 of 15; params 72+4+15+3.
EXPECTED = {
    "layers": {
        "Conv_0/kernel": {"kind": "group", "weights": 72, "nonzero_weights": 36,
                          "weight_density": 0.5, "groups": 4, "nonzero_groups": 2,
                          "group_density": 0.5},
        "Dense_0/kernel": {"kind": "lasso", "weights": 15, "nonzero_weights": 4,
                           "weight_density": 4 / 15, "groups": 15, "nonzero_groups": 4,
                           "group_density": 4 / 15},
    },
    "total": {"weights": 87, "nonzero_weights": 40, "weight_density": 40 / 87,
              "groups": 19, "nonzero_groups": 6, "group_density": 6 / 19, "params": 94},
}


def _assert_report(r, python_types):
  assert list(r) == ["layers", "total"]
  assert list(r["layers"]) == list(EXPECTED["layers"])
  for got, want in [(r["layers"][k], v) for k, v in EXPECTED["layers"].items()] + [
      (r["total"], EXPECTED["total"])]:
    if python_types:
      assert list(got) == list(want)  # exact layout and key order
    else:
      assert sorted(got) == sorted(want)  # jit returns dicts with sorted keys
    for k, v in want.items():
      if k == "kind":
        assert got[k] == v
      else:
        np.testing.assert_allclose(float(got[k]), v, rtol=1e-6, err_msg=k)
        if python_types:
          assert type(got[k]) is (float if "density" in k else int), k


def test_report_hand_counts_outside_jit():
  s = _state()
  _assert_report(osl.sparsity_report(s), python_types=True)
  _assert_report(osl.sparsity_report(s, _params()), python_types=True)


def test_report_under_jit_and_in_chain():
  s = _state()
  r = jax.jit(osl.sparsity_report)(s, _params())
  _assert_report(r, python_types=False)
  chained = optax.chain(optax.add_decayed_weights(1e-4), osl.splitlbi(0.1))
  cs = chained.init(_params())
  cs = (cs[0], _state())
  _assert_report(osl.sparsity_report(cs), python_types=True)


def test_report_of_a_state_without_momentum_buffers():
  """With an Adam direction the state keeps no b, only the leaves' static shapes."""
  s = _state(osl.splitlbi(0.1, direction=optax.scale_by_adam()))
  assert jax.tree.leaves(s.momentum) == []
  _assert_report(osl.sparsity_report(s), python_types=True)
  _assert_report(osl.sparsity_report(s, _params()), python_types=True)
  _assert_report(jax.jit(osl.sparsity_report)(s), python_types=False)


def test_report_params_mismatch_and_no_penalized_leaves():
  with pytest.raises(ValueError, match="structure"):
    osl.sparsity_report(_state(), {"w": jnp.zeros(3)})
  s = osl.splitlbi(0.1, penalty=lambda path, x: None).init(_params())
  r = osl.sparsity_report(s)
  assert r["layers"] == {}
  assert r["total"]["weights"] == 0 and r["total"]["weight_density"] == 0.0
  assert r["total"]["params"] == 94


def test_format_report_table():
  text = osl.format_report(osl.sparsity_report(_state()))
  lines = text.splitlines()
  assert lines[0].split() == ["layer", "kind", "nonzero/weights", "density",
                              "nonzero/groups", "density"]
  conv = next(line for line in lines if line.startswith("Conv_0/kernel"))
  assert conv.split() == ["Conv_0/kernel", "group", "36/72", "50.00%", "2/4", "50.00%"]
  dense = next(line for line in lines if line.startswith("Dense_0/kernel"))
  assert dense.split() == ["Dense_0/kernel", "lasso", "4/15", "26.67%", "4/15", "26.67%"]
  total = next(line for line in lines if line.startswith("total"))
  assert total.split() == ["total", "40/87", "45.98%", "6/19", "31.58%"]
  assert lines[-1] == "parameters (all leaves): 94"
  # Columns are aligned: every row ends at the same column as the header.
  table = [line for line in lines[:-1] if not line.startswith("-")]
  assert len({len(line) for line in table}) == 1


def test_group_norms_tree_matches_numpy():
  s = _state()
  params = _params()
  n = osl.group_norms_tree(params, s)
  want_conv = np.sqrt((W_CONV.astype(np.float64) ** 2).sum(axis=(0, 1, 2), keepdims=True))
  np.testing.assert_allclose(n["Conv_0"]["kernel"], want_conv, rtol=1e-5)
  np.testing.assert_allclose(n["Dense_0"]["kernel"], np.abs(W_DENSE), rtol=1e-6)
  assert n["Conv_0"]["bias"] is None
  flat = jax.jit(lambda p, st: osl.group_norms_tree(p, st, keepdims=False))(params, s)
  np.testing.assert_allclose(flat["Conv_0"]["kernel"], want_conv.reshape(4), rtol=1e-5)
  np.testing.assert_allclose(flat["Dense_0"]["kernel"], np.abs(W_DENSE).reshape(15), rtol=1e-6)
  # On Γ (None at unpenalized leaves) and on V (MaskedNode there).
  g_conv, _ = _gamma()
  ng = osl.group_norms_tree(osl.gamma(s), s, keepdims=False)
  np.testing.assert_allclose(ng["Conv_0"]["kernel"], [0, 0.5, 0, np.sqrt(18)], rtol=1e-6)
  nv = osl.group_norms_tree(osl.find_state(s).v, s)
  np.testing.assert_array_equal(nv["Conv_0"]["kernel"], np.zeros((1, 1, 1, 4)))


def test_coupling_residue_matches_numpy():
  s = _state()
  g_conv, g_dense = _gamma()
  nu = 10.0
  r = osl.coupling_residue(_params(), s, nu=nu)
  assert list(r) == ["Conv_0/kernel", "Dense_0/kernel"]
  np.testing.assert_allclose(r["Conv_0/kernel"], ((W_CONV - g_conv) ** 2).sum() / 20, rtol=1e-5)
  np.testing.assert_allclose(r["Dense_0/kernel"], ((W_DENSE - g_dense) ** 2).sum() / 20,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="nu"):
    osl.coupling_residue(_params(), s)
  # ν from inject_hyperparams.
  inj = optax.inject_hyperparams(osl.splitlbi)(learning_rate=0.1, nu=4.0)
  si = inj.init(_params())
  si = si._replace(inner_state=_state())
  ri = jax.jit(osl.coupling_residue)(_params(), si)
  np.testing.assert_allclose(ri["Dense_0/kernel"], ((W_DENSE - g_dense) ** 2).sum() / 8,
                             rtol=1e-5)


def test_report_on_given_masks():
  s = _state()
  m = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 4), bool), "bias": None},
       "Dense_0": None}
  m["Conv_0"]["kernel"][..., 2] = True               # one filter of 18 weights
  r = osl.sparsity_report(s, masks=m)
  conv = r["layers"]["Conv_0/kernel"]
  assert (conv["nonzero_weights"], conv["nonzero_groups"]) == (18, 1)
  dense = r["layers"]["Dense_0/kernel"]                # None: everything kept
  assert (dense["nonzero_weights"], dense["nonzero_groups"]) == (15, 15)
  assert r["total"]["nonzero_weights"] == 33 and r["total"]["nonzero_groups"] == 16
  # A partial group counts its kept entries and as one nonzero group.
  partial = {"Conv_0": {"kernel": np.zeros((3, 3, 2, 4), bool), "bias": None},
             "Dense_0": False}
  partial["Conv_0"]["kernel"][0, 0, 0, 1] = True
  partial["Conv_0"]["kernel"][1, 0, 0, 3] = True
  r = jax.jit(lambda st, mm: osl.sparsity_report(st, masks=mm))(s, partial)
  assert int(r["total"]["nonzero_weights"]) == 2 and int(r["total"]["nonzero_groups"]) == 2
  # Masks from prune_to_sparsity: exactly the requested fraction.
  half = osl.prune_to_sparsity(_params(), s, 0.5)
  r = osl.sparsity_report(s, masks=half)
  assert r["layers"]["Conv_0/kernel"]["group_density"] == 0.5
  assert r["layers"]["Dense_0/kernel"]["nonzero_weights"] == 7  # 7.5 → 7 (halves down)
