"""The transformer study's structure helpers against hand values and an explicit gate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import models
from examples.studies import transformers as ts


class _Task:
  """The slice of ``transformers.Task`` the scores read: a tiny GPT and its batches."""

  def __init__(self):
    self.model = models.GPT(vocab=11, context=8, d_model=8, depth=2, num_heads=2,
                            head_dim=4, mlp_dim=6)
    self.sample = jnp.zeros((2, 8), jnp.int32)
    self.s = ts.Settings(score_batches=3)

  def init(self, seed):
    return self.model.init(jax.random.key(seed), self.sample)["params"]

  def losses(self, params, batch):
    logits = self.model.apply({"params": params}, batch["inputs"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)

  def batches(self, seed):
    rng = np.random.default_rng(seed)
    while True:
      w = rng.integers(0, 11, (4, 9)).astype(np.int32)
      yield {"inputs": w[:, :-1], "targets": w[:, 1:]}


@pytest.fixture(scope="module")
def gpt():
  task = _Task()
  params = task.model.init(jax.random.key(3), task.sample)["params"]
  return task, params, _groups(task, params)


def _groups(task, params):
  import optax_splitlbi as sl
  return sl.channel_groups(lambda v, x: task.model.apply(v, x), {"params": params}, task.sample,
                           rest=lambda path, leaf: None)


def test_classes_are_heads_and_neurons_per_block(gpt):
  _, _, groups = gpt
  assert [(c.name, c.size, ts.kind(c)) for c in groups.classes] == [
      ("block_0/attn/key", 2, "heads"), ("block_0/mlp_in", 6, "neurons"),
      ("block_1/attn/key", 2, "heads"), ("block_1/mlp_in", 6, "neurons")]


def test_masks_of_and_kept_round_trip_and_cover_every_member(gpt):
  _, params, groups = gpt
  keep = {"block_0/attn/key": np.array([False, True]), "block_0/mlp_in": np.arange(6) % 2 == 0,
          "block_1/attn/key": np.array([True, True]), "block_1/mlp_in": np.arange(6) < 1}
  masks = ts.masks_of(groups, params, keep)
  back = ts.kept(groups, masks)
  for name, k in keep.items():
    np.testing.assert_array_equal(back[name], k)
  m = masks["block_0"]["attn"]["value"]["kernel"]          # (d, heads, head_dim)
  assert m.shape == (8, 2, 4) and not m[:, 0].any() and m[:, 1].all()
  assert masks["block_0"]["mlp_in"]["bias"].tolist() == [True, False] * 3
  assert masks["block_0"]["mlp_out"]["kernel"] is None and masks["embed"]["embedding"] is None


def test_top_completed_and_magnitude_by_hand(gpt):
  _, params, groups = gpt
  scores = {"a": np.array([0.1, 0.9, 0.5]), "b": np.array([3.0, 1.0])}
  picked = ts.top(scores, {"a": 2, "b": 0})
  assert picked["a"].tolist() == [False, True, True] and picked["b"].tolist() == [False, False]
  done = ts.completed({"a": np.array([False, False, True]), "b": np.array([False, False])},
                      scores)
  assert done["a"].tolist() == [False, False, True] and done["b"].tolist() == [True, False]
  mag = ts.magnitude_scores(groups, params)["block_1/attn/key"]
  a = params["block_1"]["attn"]
  want = [np.sqrt(sum(np.sum(np.asarray(a[n]["kernel"][:, h]) ** 2) + np.sum(
      np.asarray(a[n]["bias"][h]) ** 2) for n in ("query", "key", "value"))) for h in (0, 1)]
  np.testing.assert_allclose(mag, want, rtol=1e-6)


def test_importance_is_the_gradient_of_a_gate_on_each_head_and_neuron(gpt):
  """|∂L/∂ξ| with ξ scaling one head's (one neuron's) output rows, computed directly."""
  task, params, groups = gpt
  got = ts.importance_scores(task, groups, params, seed=5)
  batches = task.batches(20_000 + 5)
  want = {c.name: np.zeros(c.size) for c in groups.classes}
  for _ in range(task.s.score_batches):
    batch = next(batches)
    for c in groups.classes:
      block = c.name.split("/")[0]
      layer = ("mlp_out",) if ts.kind(c) == "neurons" else ("attn", "out")
      for g in range(c.size):
        def loss(xi, c=c, g=g, block=block, layer=layer):
          p = jax.tree.map(lambda x: x, params)
          node = p[block]
          for name in layer:
            node = node[name]
          node["kernel"] = node["kernel"].at[g].multiply(xi)
          return task.losses(p, batch).mean()
        want[c.name][g] += abs(float(jax.grad(loss)(1.0))) / task.s.score_batches
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-7)


def test_narrowed_halves_heads_and_neurons_of_every_block():
  task = _Task()
  got = ts.narrowed(task)
  # by hand, d = 8, head_dim 4: a block of h heads and m neurons holds q, k, v 3·(8·4h + 4h),
  # out 4h·8 + 8, two LayerNorms 32, mlp_in 8m + m, mlp_out 8m + 8; outside the blocks the
  # tied embedding 11·8, positions 8·8 and ln_f 16. Full (h 2, m 6): 430 a block, 1028 in
  # all; half (h 1, m 3): 239 a block, 646 in all.
  assert got == {"heads": [1, 1], "neurons": [3, 3], "params_share": 646 / 1028}
  assert (task.model.num_heads, task.model.mlp_dim) == (1, 3)
  with pytest.raises(ValueError, match="narrow-adamw: num_heads=1"):
    ts.narrowed(task)


def test_heads_lam_sets_the_heads_threshold_and_leaves_the_neurons():
  """Thresholds λ·√d by hand: a head of the tiny GPT is its q, k, v columns and biases,
  d = 3·(8·4 + 4) = 108; a neuron its mlp_in column and bias, d = 8 + 1 = 9."""
  import optax_splitlbi as sl  # pylint: disable=g-import-not-at-top
  task = _Task()
  groups = ts.penalty(task, 0.01, heads_lam=0.05)
  assert [(c.name, c.lam) for c in groups.classes] == [
      ("block_0/attn/key", 0.05), ("block_0/mlp_in", 0.01),
      ("block_1/attn/key", 0.05), ("block_1/mlp_in", 0.01)]
  threshold = np.asarray(sl.splitlbi(0.1, lam=0.01, penalty=groups).init(task.init(0)).threshold)
  np.testing.assert_allclose(np.unique(threshold), [0.01 * 3, 0.05 * np.sqrt(108)], rtol=1e-6)
  same = ts.penalty(task, 0.01)
  assert [c.lam for c in same.classes] == [0.01] * 4
