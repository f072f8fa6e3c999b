"""channel_groups: SplitLBI's cross-leaf groups are the channel classes slimming
removes, checked against groups described by hand for ResNets, VGG, an MLP, an
attention block and an NNX model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import optax_splitlbi as sl
from examples import models
from optax_splitlbi import penalties


def _groups(model, x, **kw):
  variables = model.init(jax.random.key(0), x, train=False)
  return variables, sl.channel_groups(lambda v, x: model.apply(v, x, train=False), variables,
                                      x, **kw)


def _by_members(groups):
  """frozenset(members) → class, for comparisons that do not depend on names."""
  return {frozenset(c.members): c for c in groups.classes}


def _conv_bn(conv, bn):
  return {(f"{conv}/kernel", 3), (f"{bn}/scale", 0), (f"{bn}/bias", 0)}


def _stage(blocks, project=None, stem=None):
  out = set()
  for b in blocks:
    out |= _conv_bn(f"BasicBlock_{b}/Conv_1", f"BasicBlock_{b}/BatchNorm_1")
  if project is not None:
    out |= _conv_bn(f"BasicBlock_{project}/proj_conv", f"BasicBlock_{project}/proj_bn")
  if stem is not None:
    out |= _conv_bn(*stem)
  return frozenset(out)


def _first_conv(b):
  return frozenset(_conv_bn(f"BasicBlock_{b}/Conv_0", f"BasicBlock_{b}/BatchNorm_0"))


@pytest.fixture(scope="module")
def resnet20():
  model = models.get_model("resnet20", width=4)
  x = jnp.ones((2, 8, 8, 3))
  variables, producers = _groups(model, x)
  _, consumers = _groups(model, x, members="consumers")
  return variables, producers, consumers


def test_resnet20_groups_are_the_residual_stages_and_the_inner_convs(resnet20):
  _, groups, _ = resnet20
  want = {_stage((0, 1, 2), stem=("Conv_0", "BatchNorm_0")): 4,
          _stage((3, 4, 5), project=3): 8, _stage((6, 7, 8), project=6): 16}
  want.update({_first_conv(b): 4 * 2**(b // 3) for b in range(9)})
  got = _by_members(groups)
  assert {m: c.size for m, c in got.items()} == want
  assert not any("Dense_0" in p for c in groups.classes for p, _ in c.members)
  # Named after the module of the first producer in the params tree; in its order.
  assert [c.name for c in groups.classes][:3] == ["BasicBlock_0/Conv_0", "BasicBlock_0/Conv_1",
                                                 "BasicBlock_1/Conv_0"]
  assert all(c.norm_only == () and c.lam is None and not c.normalized for c in groups.classes)
  assert groups.rest is None


def test_resnet20_consumers_enter_the_norms(resnet20):
  _, producers, consumers = resnet20
  assert [c.members for c in consumers.classes] == [c.members for c in producers.classes]
  got = _by_members(consumers)
  last = got[_stage((6, 7, 8), project=6)]
  assert set(last.norm_only) == {("BasicBlock_7/Conv_0/kernel", 2),
                                 ("BasicBlock_8/Conv_0/kernel", 2), ("Dense_0/kernel", 0)}
  first = got[_stage((0, 1, 2), stem=("Conv_0", "BatchNorm_0"))]
  assert set(first.norm_only) == {(f"BasicBlock_{b}/Conv_0/kernel", 2) for b in range(3)} | {
      ("BasicBlock_3/Conv_0/kernel", 2), ("BasicBlock_3/proj_conv/kernel", 2)}
  for b in range(9):
    assert got[_first_conv(b)].norm_only == ((f"BasicBlock_{b}/Conv_1/kernel", 2),)


def test_resnet20_groups_drive_splitlbi(resnet20):
  variables, groups, _ = resnet20
  params = variables["params"]
  state = sl.splitlbi(0.1, penalty=groups).init(params)
  names = {p: c.name for c in groups.classes for p, _ in c.members}
  layouts = penalties.resolve_penalties(groups, params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      state.penalty, is_leaf=lambda x: x is None)[0]:
    name = penalties.path_str(path)
    assert (leaf.shared if leaf is not None else None) == names.get(name), name
  assert layouts["BasicBlock_4"]["Conv_1"]["kernel"].layout.shared == "BasicBlock_3/Conv_1"
  assert state.penalty["Dense_0"]["kernel"].kind == "lasso"   # rest: default_penalty


def test_bottleneck_stage_groups():
  model = models.get_model("resnet50", width=2, small_inputs=True, stage_sizes=(2,))
  _, groups = _groups(model, jnp.ones((2, 6, 6, 3)))
  block = lambda b, c, n: _conv_bn(f"BottleneckBlock_{b}/Conv_{c}",  # noqa: E731
                                   f"BottleneckBlock_{b}/BatchNorm_{n}")
  want = {frozenset(_conv_bn("conv_init", "bn_init")): 2,
          frozenset(block(0, 0, 0)): 2, frozenset(block(0, 1, 1)): 2,
          frozenset(block(1, 0, 0)): 2, frozenset(block(1, 1, 1)): 2,
          frozenset(block(0, 2, 2) | block(1, 2, 2) | _conv_bn(
              "BottleneckBlock_0/proj_conv", "BottleneckBlock_0/proj_bn")): 8}
  assert {m: c.size for m, c in _by_members(groups).items()} == want


def test_vgg_one_group_per_conv_with_its_batchnorm():
  model = models.get_model("vgg16", width=1 / 16, cfg=(64, "M", 128, 128))
  _, groups = _groups(model, jnp.ones((2, 8, 8, 3)))
  assert [(c.name, c.size, set(c.members)) for c in groups.classes] == [
      (f"Conv_{i}", n, _conv_bn(f"Conv_{i}", f"BatchNorm_{i}")) for i, n in enumerate((4, 8, 8))]


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(5)(x))
    x = nn.relu(nn.Dense(4)(x))
    return nn.Dense(3)(x)


def test_mlp_neurons_and_their_consumers():
  x = jnp.ones((2, 6))
  variables, groups = _groups(MLP(), x)
  assert [(c.name, c.size, c.members, c.norm_only) for c in groups.classes] == [
      ("Dense_0", 5, (("Dense_0/bias", 0), ("Dense_0/kernel", 1)), ()),
      ("Dense_1", 4, (("Dense_1/bias", 0), ("Dense_1/kernel", 1)), ())]
  # Variables without a "params" key: every leaf counts, paths relative to them.
  bare = sl.channel_groups(lambda p, x: MLP().apply({"params": p}, x), variables["params"], x)
  assert bare == groups
  _, groups = _groups(MLP(), x, members="consumers", lam=0.5, normalized=True)
  assert [c.norm_only for c in groups.classes] == [(("Dense_1/kernel", 0),),
                                                   (("Dense_2/kernel", 0),)]
  assert all(c.lam == 0.5 and c.normalized for c in groups.classes)
  # A consumer without a penalty of its own does not enter the norms.
  only_dense_1 = lambda p, w: "lasso" if p[0].key == "Dense_1" and w.ndim == 2 else None  # noqa
  _, groups = _groups(MLP(), x, members="consumers", rest=only_dense_1)
  assert [c.norm_only for c in groups.classes] == [(("Dense_1/kernel", 0),), ()]


class Attention(nn.Module):
  """Self-attention with 2 heads of size 4 and a dense head (as in test_slim_frameworks)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    h = nn.MultiHeadDotProductAttention(2, qkv_features=8, name="attn")(x)
    y = nn.relu(nn.Dense(5, name="Dense_0")(nn.LayerNorm()(x + h)))
    return nn.Dense(3, name="Dense_1")(y.mean(1))


def test_attention_heads_are_one_class_over_query_key_value():
  _, groups = _groups(Attention(), jnp.ones((2, 5, 6)), members="consumers", rest="lasso")
  heads = {(f"attn/{p}/kernel", 1) for p in ("query", "key", "value")}
  heads |= {(f"attn/{p}/bias", 0) for p in ("query", "key", "value")}
  assert [(c.name, c.size, set(c.members)) for c in groups.classes] == [
      ("Dense_0", 5, {("Dense_0/kernel", 1), ("Dense_0/bias", 0)}),
      ("attn/key", 2, heads)]
  assert groups.classes[1].norm_only == (("attn/out/kernel", 0),)
  # No head_dim class: the value kernel has fewer heads than head dims, so it went to heads.
  assert not any(("attn/value/kernel", 2) in c.members for c in groups.classes)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 5, rngs=rngs)
    self.bn = nnx.BatchNorm(5, rngs=rngs)
    self.fc2 = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def test_nnx_paths_match_the_param_state():
  model = NNXMLP(nnx.Rngs(0))
  model.eval()
  groups = sl.channel_groups_nnx(model, jnp.ones((2, 6)), members="consumers")
  assert [(c.name, c.size, c.members, c.norm_only) for c in groups.classes] == [
      ("fc1", 5, (("bn/bias", 0), ("bn/scale", 0), ("fc1/bias", 0), ("fc1/kernel", 1)),
       (("fc2/kernel", 0),))]
  layouts = penalties.resolve_penalties(groups, nnx.state(model, nnx.Param))
  assert layouts["fc1"]["kernel"].layout.shared == "fc1"
  assert layouts["fc2"]["kernel"].layout.norm_of == (("fc1", 0),)


def test_unknown_members_mode_is_an_error():
  with pytest.raises(ValueError, match="members"):
    _groups(MLP(), jnp.ones((2, 6)), members="bogus")


def test_exported():
  assert sl.slimming.channel_groups is sl.channel_groups
  for name in ("channel_groups", "channel_groups_nnx", "ChannelGroups", "GroupClass"):
    assert name in sl.__all__ and getattr(sl, name).__doc__
