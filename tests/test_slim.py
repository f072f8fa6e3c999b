"""Slimming on small hand-written networks: folds computed by hand, coupling through
concatenations and grouped / depthwise convs, the consumer route, batch sizes,
zero-width layers and the error cases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_splitlbi as sl

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, k, padding="SAME", groups=1):
  return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=DN,
                                      feature_group_count=groups)


def two_convs(padding):
  """conv3×3(4, SAME) + bias → ReLU → conv3×3(3, ``padding``) + bias, as plain jax."""
  def apply(v, x):
    h = jax.nn.relu(conv(x, v["c1"]["kernel"]) + v["c1"]["bias"])
    return conv(h, v["c2"]["kernel"], padding) + v["c2"]["bias"]
  return apply


def _vars(rng, **shapes):
  return {name: {"kernel": rng.normal(size=s).astype(np.float32),
                 "bias": rng.normal(size=s[-1]).astype(np.float32)} for name, s in shapes.items()}


def _filters(keep, shape):
  return np.broadcast_to(np.asarray(keep, bool), shape)


def _setup_two_convs(rng):
  v = _vars(rng, c1=(3, 3, 2, 4), c2=(3, 3, 4, 3))
  v["c1"]["bias"][1] = 0.7                  # pruned filter 1: constant ReLU(0.7) = 0.7
  masks = {"c1": {"kernel": _filters([1, 0, 1, 1], (3, 3, 2, 4)), "bias": None},
           "c2": {"kernel": None, "bias": None}}
  x = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
  return v, masks, x


def _masked(v, masks):
  return jax.tree.map(lambda p, m: p if m is None else p * m, v, masks,
                      is_leaf=lambda m: m is None)


def test_fold_into_bias_after_a_valid_conv_is_exact_and_by_hand():
  rng = np.random.default_rng(0)
  v, masks, x = _setup_two_convs(rng)
  apply = two_convs("VALID")
  res = sl.slim(apply, v, masks, x)
  assert res.variables["c1"]["kernel"].shape == (3, 3, 2, 3)
  assert res.variables["c2"]["kernel"].shape == (3, 3, 3, 3)
  # By hand: the removed channel (value 0.7 everywhere) adds 0.7·Σ_taps W2[:, :, 1, :].
  want_bias = v["c2"]["bias"] + 0.7 * v["c2"]["kernel"][:, :, 1, :].sum((0, 1))
  np.testing.assert_allclose(res.variables["c2"]["bias"], want_bias, rtol=1e-5)
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  (fold,) = res.report["folds"]
  assert fold["exact"] and fold["into"] == "c2/bias"
  assert fold["contribution"] == pytest.approx(np.abs(want_bias - v["c2"]["bias"]).max(), 1e-5)


def test_zero_padded_conv_fold_is_inexact_reported_and_measured():
  rng = np.random.default_rng(1)
  v, masks, x = _setup_two_convs(rng)
  apply = two_convs("SAME")
  res = sl.slim(apply, v, masks, x)
  # Folded at the centre: the interior value 0.7·Σ_taps W2[:, :, 1, :].
  taps = v["c2"]["kernel"][:, :, 1, :]
  np.testing.assert_allclose(res.variables["c2"]["bias"], v["c2"]["bias"] + 0.7 * taps.sum((0, 1)),
                             rtol=1e-5)
  # At the corner (0, 0) the zero padding hides kernel rows 0 and columns 0.
  corner = 0.7 * (taps.sum((0, 1)) - taps[1:, 1:].sum((0, 1)))
  got = np.asarray(res.apply_fn(res.variables, x))
  want = np.asarray(apply(_masked(v, masks), x))
  np.testing.assert_allclose(got[:, 0, 0] - want[:, 0, 0], np.broadcast_to(corner, (3, 3)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
  (fold,) = res.report["folds"]
  assert not fold["exact"] and fold["into"] == "c2/bias"
  assert fold["max_error"] == pytest.approx(np.abs(got - want).max(), rel=1e-4)
  assert res.report["max_abs_diff"] == pytest.approx(np.abs(got - want).max(), rel=1e-4)
  assert "inexact" in sl.format_slim_report(res.report)


def test_keep_policy_keeps_the_channel_and_is_exact():
  rng = np.random.default_rng(1)
  v, masks, x = _setup_two_convs(rng)
  apply = two_convs("SAME")
  res = sl.slim(apply, v, masks, x, inexact="keep")
  assert res.variables["c1"]["kernel"].shape == (3, 3, 2, 4)
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-6, atol=1e-6)
  why = res.report["layers"]["c1/kernel"]["kept_because"]
  assert list(why.values()) == [1] and "inexact='keep'" in next(iter(why))
  # A channel that is 0 after the ReLU needs no fold and goes even under "keep".
  v["c1"]["bias"][1] = -0.5
  res = sl.slim(apply, v, masks, x, inexact="keep")
  assert res.variables["c1"]["kernel"].shape == (3, 3, 2, 3) and not res.report["folds"]


def test_concatenated_channels_are_cut_segment_by_segment():
  rng = np.random.default_rng(2)
  v = _vars(rng, a=(3, 3, 2, 4), b=(3, 3, 2, 4), c=(1, 1, 8, 5))

  def apply(v, x):
    ha = jax.nn.relu(conv(x, v["a"]["kernel"]) + v["a"]["bias"])
    hb = jax.nn.relu(conv(x, v["b"]["kernel"]) + v["b"]["bias"])
    h = jnp.concatenate([ha, hb], axis=-1)
    return conv(h, v["c"]["kernel"], "VALID") + v["c"]["bias"]

  masks = {"a": {"kernel": _filters([0, 0, 1, 1], (3, 3, 2, 4)), "bias": None},
           "b": {"kernel": _filters([1, 1, 0, 1], (3, 3, 2, 4)), "bias": None},
           "c": {"kernel": None, "bias": None}}
  x = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
  res = sl.slim(apply, v, masks, x)
  # Rows 0, 1 (a) and 4 + 2 (b) of the 1×1 conv go.
  np.testing.assert_array_equal(res.variables["c"]["kernel"][0, 0],
                                v["c"]["kernel"][0, 0][[2, 3, 4, 5, 7]])
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  assert res.report["params"]["slim"] == 9 * 2 * 2 + 2 + 9 * 2 * 3 + 3 + 5 * 5 + 5
  cut = res.cut(v)  # any tree shaped like the variables
  np.testing.assert_array_equal(cut["a"]["kernel"], v["a"]["kernel"][..., [2, 3]])
  np.testing.assert_array_equal(cut["c"]["kernel"], res.variables["c"]["kernel"])


def grouped_chain(groups):
  """conv a → ReLU → conv g with ``groups`` groups → ReLU → 1×1 conv c."""
  def apply(v, x):
    h = jax.nn.relu(conv(x, v["a"]["kernel"]) + v["a"]["bias"])
    h = jax.nn.relu(conv(h, v["g"]["kernel"], groups=groups) + v["g"]["bias"])
    return conv(h, v["c"]["kernel"], "VALID") + v["c"]["bias"]
  return apply


def test_depthwise_conv_couples_its_input_and_output_channels():
  rng = np.random.default_rng(3)
  v = _vars(rng, a=(3, 3, 2, 6), g=(3, 3, 1, 6), c=(1, 1, 6, 4))
  apply = grouped_chain(groups=6)
  v["a"]["bias"][:] = -1.0   # a's pruned channels are 0: the depthwise SAME conv stays exact
  masks = {"a": {"kernel": _filters([1, 0, 0, 1, 1, 1], (3, 3, 2, 6)), "bias": None},
           "g": {"kernel": _filters([1, 0, 0, 1, 1, 0], (3, 3, 1, 6)), "bias": None},
           "c": {"kernel": None, "bias": None}}
  x = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
  res = sl.slim(apply, v, masks, x)
  # Channels 1, 2 are pruned on both sides of the depthwise conv; 5 only in g.
  assert res.variables["a"]["kernel"].shape == (3, 3, 2, 4)
  assert res.variables["g"]["kernel"].shape == (3, 3, 1, 4)
  assert res.variables["c"]["kernel"].shape == (1, 1, 4, 4)
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  rep = res.report["layers"]["g/kernel"]
  assert (rep["pruned"], rep["removed"], rep["kept_pruned"]) == (3, 2, 1)
  assert any("'a/kernel'" in why for why in rep["kept_because"])


def test_grouped_conv_removes_an_in_group_index_only_in_every_group():
  rng = np.random.default_rng(4)
  v = _vars(rng, a=(1, 1, 3, 8), g=(1, 1, 4, 8), c=(1, 1, 8, 2))
  apply = grouped_chain(groups=2)

  # Output j of group 0 is channel j, of group 1 channel 4 + j: only j = 1 goes.
  masks = {"a": {"kernel": None, "bias": None},
           "g": {"kernel": _filters([1, 0, 0, 1, 1, 0, 1, 1], (1, 1, 4, 8)), "bias": None},
           "c": {"kernel": None, "bias": None}}
  x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  res = sl.slim(apply, v, masks, x)
  np.testing.assert_array_equal(res.variables["g"]["kernel"][0, 0],
                                _masked(v, masks)["g"]["kernel"][0, 0][:, [0, 2, 3, 4, 6, 7]])
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  assert res.report["layers"]["g/kernel"]["kept_pruned"] == 1


def test_lasso_rows_pruned_in_the_consumer_remove_the_neuron():
  rng = np.random.default_rng(5)
  v = _vars(rng, d1=(6, 5), d2=(5, 3))

  def apply(v, x):
    return jax.nn.relu(x @ v["d1"]["kernel"] + v["d1"]["bias"]) @ v["d2"]["kernel"] + v["d2"]["bias"]

  m1 = rng.random((6, 5)) > 0.3
  m1[:, 4] = False                  # neuron 4: no incoming weight (constant, folded)
  m2 = rng.random((5, 3)) > 0.3
  m2[1, :] = False                  # neuron 1: no outgoing weight (read by nobody)
  m2[3, 1:] = False                 # neuron 3: one outgoing weight left: kept
  masks = {"d1": {"kernel": m1, "bias": None}, "d2": {"kernel": m2, "bias": None}}
  x = rng.normal(size=(4, 6)).astype(np.float32)
  res = sl.slim(apply, v, masks, x)
  assert res.variables["d1"]["kernel"].shape == (6, 3)
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  assert res.report["params"] == dict(dense=6 * 5 + 5 + 5 * 3 + 3, slim=6 * 3 + 3 + 3 * 3 + 3,
                                      masked=int(m1.sum() + m2.sum()) + 5 + 3)


def test_a_pruned_spatial_position_after_a_flatten_stays():
  rng = np.random.default_rng(10)
  v = _vars(rng, c=(3, 3, 1, 4), d=(16 * 4, 3))

  def apply(v, x):
    h = jax.nn.relu(conv(x, v["c"]["kernel"], "VALID") + v["c"]["bias"])  # 4×4×4
    return h.reshape(h.shape[0], -1) @ v["d"]["kernel"] + v["d"]["bias"]

  rows = rng.random((4, 4, 4, 3)) > 0.2
  rows[0] = False                   # every weight of spatial row 0 of the flatten
  rows[:, :, 2] = False             # and of channel 2
  masks = {"c": {"kernel": None, "bias": None}, "d": {"kernel": rows.reshape(64, 3), "bias": None}}
  x = rng.normal(size=(2, 6, 6, 1)).astype(np.float32)
  res = sl.slim(apply, v, masks, x)
  # Channel 2 goes (no one reads it); the spatial row cannot (the conv fixes the size).
  assert res.variables["c"]["kernel"].shape == (3, 3, 1, 3)
  np.testing.assert_array_equal(res.variables["d"]["kernel"],
                                rows.reshape(64, 3)[np.arange(64) % 4 != 2]
                                * v["d"]["kernel"][np.arange(64) % 4 != 2])
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)


def test_slim_apply_takes_other_batch_sizes_unless_the_batch_is_reduced():
  rng = np.random.default_rng(6)
  v, masks, x = _setup_two_convs(rng)
  res = sl.slim(two_convs("VALID"), v, masks, x, count_flops=False)
  assert res.report["batch_resizable"]
  assert res.apply_fn(res.variables, np.zeros((7, 6, 6, 2), np.float32)).shape == (7, 4, 4, 3)

  def centred(v, x):  # subtracts the batch mean: the batch size is baked in
    y = two_convs("VALID")(v, x)
    return y - y.mean(0)

  res = sl.slim(centred, v, masks, x, count_flops=False)
  assert not res.report["batch_resizable"]
  with pytest.raises(ValueError, match="reduced over by reduce_sum"):
    res.apply_fn(res.variables, np.zeros((7, 6, 6, 2), np.float32))


def test_flops_come_from_xla_cost_analysis():
  rng = np.random.default_rng(7)
  v, masks, x = _setup_two_convs(rng)
  res = sl.slim(two_convs("VALID"), v, masks, x)
  # XLA counts 2·Cin·Cout FLOPs per kernel tap inside the image (a 3×3 SAME conv
  # on 6×6: 16² taps, not 36·9) and one per element of each bias add and ReLU.
  def by_hand(c):  # c = kept channels of c1
    return 3 * (2 * 2 * c * 16**2 + 2 * 36 * c + 2 * c * 3 * 16 * 9 + 16 * 3)
  f = res.report["flops"]
  assert (f["dense"], f["slim"], f["batch"]) == (by_hand(4), by_hand(3), 3)
  assert 0 < f["bytes_slim"] < f["bytes_dense"]


# ----------------------------------------------------------------------------- errors


def test_a_mask_that_prunes_every_filter_leaves_a_zero_width_layer_but_not_at_the_output():
  rng = np.random.default_rng(8)
  v, masks, x = _setup_two_convs(rng)
  masks["c1"]["kernel"] = np.zeros((1, 1, 1, 4), bool)  # keepdims layout
  apply = two_convs("VALID")
  res = sl.slim(apply, v, masks, x)
  assert res.variables["c1"]["kernel"].shape == (3, 3, 2, 0)
  assert res.variables["c2"]["kernel"].shape == (3, 3, 0, 3)
  # By hand: c1 is the constant ReLU(b1); c2 adds Σ_c ReLU(b1_c)·Σ_taps W2[:, :, c, :].
  want_bias = v["c2"]["bias"] + np.einsum("c,hwco->o", np.maximum(v["c1"]["bias"], 0),
                                          v["c2"]["kernel"])
  np.testing.assert_allclose(res.variables["c2"]["bias"], want_bias, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  # The model output has no zero width: all of c2's filters pruned, none removed.
  masks["c2"]["kernel"] = np.zeros((1, 1, 1, 3), bool)
  rep = sl.slim(apply, v, masks, x, count_flops=False).report["layers"]["c2/kernel"]
  assert (rep["pruned"], rep["removed"]) == (3, 0) and "the model output" in rep["kept_because"]


def test_masks_that_do_not_match_the_params_are_errors_naming_the_leaf():
  rng = np.random.default_rng(9)
  v, masks, x = _setup_two_convs(rng)
  bad = dict(masks, c3={"kernel": np.ones((3, 3, 4, 3), bool)})
  with pytest.raises(ValueError, match=r"leaf 'c3/kernel' is not a variable"):
    sl.slim(two_convs("VALID"), v, bad, x)
  bad = dict(masks, c2={"kernel": np.ones((3, 3, 3, 3), bool), "bias": None})
  with pytest.raises(ValueError, match=r"mask 'c2/kernel' has shape \(3, 3, 3, 3\)"):
    sl.slim(two_convs("VALID"), v, bad, x)
  with pytest.raises(ValueError, match="inexact must be one of"):
    sl.slim(two_convs("VALID"), v, masks, x, inexact="ignore")


def test_an_operation_the_analysis_does_not_know_is_an_error_naming_it_and_the_layer():
  class Shuffle(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3), name="conv_a")(x))
      h = jnp.take(h, jnp.asarray([3, 2, 1, 0]), axis=-1)   # a gather on the channels
      return nn.Dense(2)(h.mean((1, 2)))

  model = Shuffle()
  x = jnp.ones((2, 5, 5, 1))
  variables = model.init(jax.random.key(0), x)
  masks = {"conv_a": {"kernel": _filters([1, 0, 1, 1], (3, 3, 1, 4)), "bias": None},
           "Dense_0": {"kernel": None, "bias": None}}
  with pytest.raises(ValueError, match=r"'params/conv_a/kernel'.*primitive 'gather' at "
                                       r"'Shuffle'.*does not understand"):
    sl.slim(model.apply, variables, masks, x)
  # Where nothing would be removed, the unknown op is harmless.
  masks["conv_a"]["kernel"] = None
  res = sl.slim(model.apply, variables, masks, x, count_flops=False)
  assert res.report["params"]["slim"] == res.report["params"]["dense"]


def test_slim_linen_needs_a_resized_method():
  model = nn.Dense(3)
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="Dense has no resized"):
    sl.slim_linen(model, variables, {"kernel": np.ones((4, 3), bool), "bias": None}, x)


@pytest.mark.parametrize("round_to, width", [(1, 3), (2, 4), (4, 4), (8, 8)])
def test_round_to_keeps_a_multiple_of_channels_exactly(round_to, width):
  rng = np.random.default_rng(7)
  v = _vars(rng, c1=(1, 1, 2, 8), c2=(1, 1, 8, 3))   # 1×1 convs: every fold is exact
  keep = [1, 0, 0, 1, 0, 1, 0, 0]                     # 3 of 8 filters
  masks = {"c1": {"kernel": _filters(keep, (1, 1, 2, 8)), "bias": None},
           "c2": {"kernel": None, "bias": None}}
  x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  apply = two_convs("SAME")

  res = sl.slim(apply, v, masks, x, round_to=round_to, count_flops=False)

  assert res.variables["c1"]["kernel"].shape == (1, 1, 2, width)
  assert res.variables["c2"]["kernel"].shape == (1, 1, width, 3)
  # kept back: the lowest-index pruned filters (1, 2, 4, ...), with zero weights
  kept = sorted([0, 3, 5] + [1, 2, 4, 6, 7][:width - 3])
  if width < 8:
    np.testing.assert_array_equal(res.kept["c1"]["kernel"][-1], kept)
  else:
    assert res.kept["c1"]["kernel"][-1] is None  # all kept
  np.testing.assert_allclose(res.apply_fn(res.variables, x), apply(_masked(v, masks), x),
                             rtol=1e-5, atol=1e-5)
  rep = res.report["layers"]["c1/kernel"]
  assert rep["kept_pruned"] == width - 3
  if width > 3:
    assert rep["kept_because"] == {
        f"the width is rounded up to a multiple of {round_to} (round_to)": width - 3}


@pytest.mark.parametrize("bad", [0, -8, 2.0, True])
def test_round_to_must_be_a_positive_int(bad):
  rng = np.random.default_rng(0)
  v, masks, x = _setup_two_convs(rng)
  with pytest.raises(ValueError, match="round_to"):
    sl.slim(two_convs("VALID"), v, masks, x, round_to=bad)


def test_mask_keys_that_name_no_variable_are_errors():
  import jax.numpy as jnp
  import optax_splitlbi as sl
  variables = {"w": jnp.ones((3, 2))}
  apply = lambda v, x: x @ v["w"]  # noqa: E731
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="'u' is not a variable"):
    sl.slim(apply, variables, {"u": None}, x)
  with pytest.raises(ValueError, match="'u' is not a variable"):
    sl.slim(apply, variables, {"w": None, "u": None}, x)
  sl.slim(apply, variables, {"w": None}, x, count_flops=False)  # None: unmasked
