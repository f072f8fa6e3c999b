"""Per-leaf penalty specs: the default rule, pytree prefixes, callables, errors."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import optax_splitlbi as sl
from optax_splitlbi.penalties import LeafPenalty, path_str, resolve_leaf, resolve_penalties

PARAMS = {"Conv_0": {"kernel": jnp.zeros((3, 3, 2, 8)), "bias": jnp.zeros(8)},
          "Dense_0": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(10)},
          "BatchNorm_0": {"scale": jnp.zeros(8)}}


def test_default_rule():
  pen = resolve_penalties(None, PARAMS)
  assert pen["Conv_0"]["kernel"].layout == LeafPenalty("group", (0, 1, 2), 18)
  assert pen["Dense_0"]["kernel"].layout == LeafPenalty("lasso", (), 1)
  assert pen["Conv_0"]["kernel"].lam is None and not pen["Conv_0"]["kernel"].normalized
  assert pen["Conv_0"]["bias"] is None and pen["BatchNorm_0"]["scale"] is None


def test_callable_by_path_and_per_leaf_lambda():
  def rule(path, leaf):
    name = path_str(path)
    if name == "Conv_0/kernel":
      return sl.conv_filters(lam=0.1, normalized=True)
    if name.startswith("Dense_0/kernel"):
      return sl.dense_neurons(lam=2.0)
    return None

  pen = resolve_penalties(rule, PARAMS)
  conv = pen["Conv_0"]["kernel"]
  assert conv.lam == 0.1 and conv.normalized and conv.threshold(1.0) == pytest.approx(0.1 * 18 ** 0.5)
  dense = pen["Dense_0"]["kernel"]
  assert dense.layout.reduce_axes == (0,) and dense.layout.group_size == 32
  assert dense.threshold(1.0) == 2.0


def test_prefix_tree_and_single_spec():
  pen = resolve_penalties(
      {"Conv_0": {"kernel": "group", "bias": None}, "Dense_0": None, "BatchNorm_0": None}, PARAMS)
  assert pen["Conv_0"]["kernel"].layout.kind == "group"
  assert pen["Dense_0"]["kernel"] is None
  pen = resolve_penalties(sl.Lasso(0.5), PARAMS)
  assert all(p.layout.kind == "lasso" and p.lam == 0.5
             for p in [pen["Conv_0"]["bias"], pen["BatchNorm_0"]["scale"]])


def test_group_variants():
  k = (3, 3, 4, 8)
  assert resolve_leaf(sl.conv_input_channels(), k, "k").layout.reduce_axes == (0, 1, 3)
  assert resolve_leaf(sl.dense_inputs(), (5, 6), "k").layout.reduce_axes == (1,)
  heads = resolve_leaf(sl.attention_heads(), (16, 4, 8), "k").layout
  assert heads.reduce_axes == (0, 2) and heads.group_size == 128
  assert resolve_leaf(sl.GroupLasso((-1,)), (5, 6), "k").layout.reduce_axes == (1,)


@pytest.mark.parametrize("spec, shape, match", [
    ("group", (8,), "Conv_0/bias.*ndim >= 2"),
    (sl.GroupLasso((4,)), (3, 3), "out of range"),
    ("l1", (3, 3), "unknown penalty"),
    (42, (3, 3), "invalid penalty"),
])
def test_bad_specs_name_the_leaf(spec, shape, match):
  with pytest.raises(ValueError, match=match):
    resolve_leaf(spec, shape, "Conv_0/bias")


def test_bad_lambda_and_mismatched_tree():
  with pytest.raises(ValueError, match="lam"):
    sl.Lasso(-1.0)
  with pytest.raises(ValueError, match="penalty"):
    resolve_penalties({"Conv_0": "group", "Nope": None}, PARAMS)
