"""The growth loop (issue 19): saturated classes widen by the rule, the others keep
their widths; ``preserve`` continues function and path, ``official`` restarts them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_splitlbi as sl
from examples import grow
from examples.configs import apply_overrides
from examples.configs import grow as grow_configs


def test_official_widening_rule():
  g = grow.Growth()
  assert [grow.new_width(f, g) for f in (4, 16, 40, 41, 100)] == [8, 20, 44, 45, 110]
  assert grow.new_width(60, grow.Growth(max_width=64)) == 64
  assert grow.new_width(64, grow.Growth(max_width=64)) == 64   # capped: no growth
  assert grow.new_width(16, grow.Growth(add=8)) == 24           # the official VGG rule


def test_saturation_counts_a_channel_once_across_its_kernels():
  groups = sl.ChannelGroups((sl.GroupClass("stage", 3, (("a/kernel", 3), ("b/kernel", 1),
                                                         ("bn/scale", 0))),), None)
  a = np.zeros((1, 1, 2, 3), bool)
  a[..., 0] = True
  b = np.zeros((2, 3), bool)
  b[1, 2] = True
  sat = grow.saturation(groups, {"a": {"kernel": a}, "b": {"kernel": b},
                                 "bn": {"scale": np.ones(3, bool)}})   # BatchNorm ignored
  assert sat == {"stage": pytest.approx(2 / 3)}


def _config():
  config, g = grow_configs.GROWTH["grow/digits"]
  config = apply_overrides(config, ["max_steps_per_epoch=6", "progress=False", "lam=0.05"])
  return config, apply_overrides(g, ["round_epochs=2", "final_epochs=1", "max_rounds=3",
                                     "tau=0.5"])


def test_growth_rounds_widen_exactly_the_saturated_classes():
  config, g = _config()
  lines = []
  result = grow.grow_and_train(config, g, say=lines.append)
  history = result["history"]
  grew = 0
  for before, after in zip(history, history[1:]):
    if before["phase"] == after["phase"] or after["phase"] == "final":
      assert after["widths"] == before["widths"]   # within a round: no change
      continue
    for name, width in before["widths"].items():
      want = grow.new_width(width, g) if before["saturation"][name] >= g.tau else width
      assert after["widths"][name] == want, (name, before, after)
      grew += want > width
  assert grew > 0   # the schedule did grow something
  assert history[-1]["phase"] == "final" and result["epochs"] == len(history)
  assert result["widths"] == history[-1]["widths"]
  assert result["params"] == sum(np.size(a) for a in jax.tree.leaves(
      result["model"].init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]))
  assert "widths (in supp Γ) Conv_0=4" in lines[0]


def _narrow_net(config, g):
  from examples import models
  model = models.get_model(config.model, 10, **dict(config.model_kwargs))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  tx, groups = grow._build(config, model, variables, (8, 8, 1), 10)  # pylint: disable=protected-access
  state = tx.init(variables["params"])
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  loss = lambda p: model.apply({"params": p}, x).sum()  # noqa: E731
  for _ in range(3):   # a nonzero path
    updates, state = tx.update(jax.grad(loss)(variables["params"]), state, variables["params"])
    variables = {"params": jax.tree.map(jnp.add, variables["params"], updates)}
  return grow.Net(model, variables, tx, state, groups), x


@pytest.mark.parametrize("mode", ["preserve", "official"])
def test_grow_preserves_or_restarts(mode):
  config, g = _config()
  g = apply_overrides(g, [f"mode={mode}"])
  net, x = _narrow_net(config, g)
  out = net.model.apply(net.variables, x)
  wide = grow.grow(net, config, g, {"Conv_1": 4}, (8, 8, 1), 10, jax.random.key(5))
  assert wide.widths()["Conv_1"] == 8 and wide.widths()["Conv_0"] == 4
  new_out = wide.model.apply(wide.variables, x)
  old_v = np.asarray(sl.find_state(net.opt_state).v["Conv_1"]["kernel"])
  new_v = np.asarray(sl.find_state(wide.opt_state).v["Conv_1"]["kernel"])
  assert int(sl.find_state(wide.opt_state).count) == 3       # the schedule continues
  if mode == "preserve":
    np.testing.assert_allclose(new_out, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new_v[..., :4], old_v)
    assert not new_v[..., 4:].any()
  else:   # new outgoing weights are random too: another function, the path restarts
    assert np.abs(np.asarray(new_out) - np.asarray(out)).max() > 1e-3
    assert old_v.any() and not new_v.any()
