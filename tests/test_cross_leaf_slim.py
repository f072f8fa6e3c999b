"""A BatchNorm ResNet trained with the cross-leaf penalty slims from supp Γ exactly,
removing every zero group and keeping nothing back (issue 17)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as sl
from examples import models


def _train(penalty_of, steps=12, seed=0):
  """A thin ResNet-20 trained ``steps`` SplitLBI steps on random 8×8 images."""
  model = models.get_model("resnet20", num_classes=4, width=4)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=16))
  variables = model.init(jax.random.key(seed), x, train=False)
  apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  tx = sl.splitlbi(0.1, nu=1.0, penalty=penalty_of(apply, variables, x), record_path=True)
  params, stats = variables["params"], variables["batch_stats"]
  state = tx.init(params)

  @jax.jit
  def step(params, stats, state):
    def loss(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    grads, new = jax.grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), new["batch_stats"], state

  for _ in range(steps):
    params, stats, state = step(params, stats, state)
  return model, {"params": params, "batch_stats": stats}, state, x


def _groups(apply, variables, x, lam=0.1):
  # The classifier (no member: its output is the model's) is left unpenalized.
  return sl.channel_groups(apply, variables, x, lam=lam, normalized=True,
                           rest=lambda path, leaf: None)


@functools.lru_cache(maxsize=None)
def trained():
  return _train(_groups)


def test_every_zero_group_is_removed_and_the_slim_net_is_exact():
  model, variables, state, x = trained()
  report = sl.sparsity_report(state)
  nonzero = {n: c["nonzero_groups"] for n, c in report["classes"].items()}
  assert any(0 < k < report["classes"][n]["groups"] for n, k in nonzero.items()), nonzero
  res = sl.slim_linen(model, variables, sl.support(state), x, train=False)
  # Every member of a class keeps exactly the class's nonzero channels.
  shapes = jax.tree.map(np.shape, res.variables["params"])
  for name, c in report["classes"].items():
    for member in c["members"]:
      path = member.split("/")
      shape = functools.reduce(lambda t, k: t[k], path, shapes)
      axis = dict(_members(state, name))[member]
      assert shape[axis] == c["nonzero_groups"], (name, member, shape)
  # Nothing kept back: no pruned channel stays "because coupled", no inexact fold.
  for layer, r in res.report["layers"].items():
    assert r["kept_pruned"] == 0, (layer, r["kept_because"])
  assert all(f["exact"] for f in res.report["folds"])
  assert res.report["max_abs_diff"] <= 1e-4 * max(1.0, res.report["max_abs_output"])
  # The slim module computes W on supp Γ with BatchNorm in eval mode.
  masked = dict(variables, params=sl.sparse_params(variables["params"], state))
  np.testing.assert_allclose(res.module.apply(res.variables, x, train=False),
                             model.apply(masked, x, train=False), rtol=1e-4, atol=1e-5)


def _members(state, name):
  """``(path, axis)`` of the members of class ``name``, read from the state's layouts."""
  st = sl.find_state(state)
  out = []
  for path, _, pe, _ in sl.penalized_leaves(st):
    if pe.shared == name:
      out.append((path, sl.penalties.member_axis(pe)))
  return out


def test_per_leaf_filter_groups_keep_coupled_channels_back():
  """The gap this closes: per-leaf filter groups of the same run leave pruned filters
  that slimming must keep (residual coupling) or fold inexactly (BatchNorm shifts)."""
  model, variables, state, x = _train(lambda a, v, x: sl.by_ndim({4: sl.conv_filters(
      0.35, normalized=True), 2: sl.Lasso(0.35)}))
  masks = sl.prune_to_sparsity(None, state, 0.5, scope="layer")  # as a new user would
  res = sl.slim_linen(model, variables, masks, x, train=False, inexact="keep")
  kept = sum(r["kept_pruned"] for r in res.report["layers"].values())
  pruned = sum(r["pruned"] for r in res.report["layers"].values())
  assert pruned > 0 and kept > pruned // 4, (pruned, kept)
  folded = sl.slim_linen(model, variables, masks, x, train=False)
  assert not all(f["exact"] for f in folded.report["folds"])
  # The cross-leaf run at 50 % per class: nothing kept back, every fold exact.
  model, variables, state, x = trained()
  masks = sl.prune_to_sparsity(None, state, 0.5, scope="layer")
  res = sl.slim_linen(model, variables, masks, x, train=False, inexact="keep")
  assert sum(r["kept_pruned"] for r in res.report["layers"].values()) == 0
  assert sum(r["removed"] for r in res.report["layers"].values()) > 0
