"""Cross-leaf groups on many devices (jit / shard_map), through orbax and nnx.Optimizer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_splitlbi as sl

# One class "chan": the conv's 8 filters, the per-channel scale and shift after
# it and the 8 neurons of a dense layer added to the pooled conv output (a
# residual-like coupling); the head's rows enter its norm only.
CHAN = sl.GroupClass("chan", 8, (("conv/kernel", 3), ("norm/scale", 0), ("norm/bias", 0),
                                 ("skip/kernel", 1)), norm_only=(("head/kernel", 0),), lam=0.9)
PENALTY = sl.ChannelGroups((CHAN,), rest=lambda path, leaf: sl.Lasso(0.2) if leaf.ndim == 2
                           else None)
STEPS = 4


def init_params():
  rng = np.random.default_rng(0)
  normal = lambda scale, shape: (scale * rng.normal(size=shape)).astype(np.float32)
  return {"conv": {"kernel": normal(0.3, (3, 3, 4, 8))},
          "norm": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)},
          "skip": {"kernel": normal(0.5, (4, 8))},
          "head": {"kernel": normal(0.5, (8, 8)), "bias": np.zeros(8, np.float32)}}


def batch():
  rng = np.random.default_rng(1)
  return (rng.normal(size=(16, 5, 5, 4)).astype(np.float32),
          rng.integers(0, 8, size=16).astype(np.int32))


def apply(params, x):
  y = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y * params["norm"]["scale"] + params["norm"]["bias"]
  y = jax.nn.relu(y.mean((1, 2)) + x.mean((1, 2)) @ params["skip"]["kernel"])
  return y @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def make_opt(**kw):
  return sl.splitlbi(0.1, nu=1.0, penalty=PENALTY, record_path=True, **kw)


def train_step(opt, params, state, x, y):
  updates, state = opt.update(jax.grad(loss_fn)(params, x, y), state, params)
  return optax.apply_updates(params, updates), state


@functools.lru_cache(maxsize=None)
def single(steps=STEPS):
  opt, (x, y) = make_opt(), batch()
  params = jax.device_put(init_params(), jax.devices()[0])
  state = opt.init(params)
  step = jax.jit(functools.partial(train_step, opt))
  out = []
  for _ in range(steps):
    params, state = step(params, state, x, y)
    out.append(jax.device_get((params, state)))
  return out


def _close(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=1e-5, atol=atol)


def test_reference_is_a_nontrivial_path():
  params, state = single()[-1]
  chan = np.asarray(sl.group_support(state)["conv"]["kernel"]).reshape(-1)
  assert 0 < chan.sum() < 8, chan
  np.testing.assert_array_equal(np.asarray(sl.group_support(state)["skip"]["kernel"]).reshape(-1),
                                chan)


SPECS = {  # FSDP on the class's member axis, and on other axes
    "member_axis": {"conv": {"kernel": P(None, None, None, "d")},
                    "norm": {"scale": P("d"), "bias": P("d")}, "skip": {"kernel": P(None, "d")},
                    "head": {"kernel": P("d", None), "bias": P()}},
    "reduced_axes": {"conv": {"kernel": P(None, None, "d", None)},
                     "norm": {"scale": P(), "bias": P()}, "skip": {"kernel": P("d", None)},
                     "head": {"kernel": P(), "bias": P()}},
}


@pytest.mark.parametrize("layout", sorted(SPECS))
def test_jit_sharded_equals_single_device(layout):
  mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  specs = SPECS[layout]
  shard = lambda tree: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                    tree, specs)
  opt, (x, y) = make_opt(), batch()
  params = shard(init_params())
  state = opt.init(params)
  assert state.v["conv"]["kernel"].sharding == params["conv"]["kernel"].sharding
  step = jax.jit(functools.partial(train_step, opt))
  for want in single():
    params, state = step(params, state, x, y)
    _close((params, state.v, state.gamma, state.entry), (want[0], want[1].v, want[1].gamma,
                                                          want[1].entry))


def test_shard_map_splits_reduced_axes_with_param_specs():
  mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  specs = SPECS["reduced_axes"]
  opt, (x, y) = make_opt(param_specs=specs), batch()
  params = init_params()
  state = opt.init(params)
  state_specs = _state_specs(state, specs)

  def update(p, g, s):  # gradients from the full forward pass; only the update is split
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  sharded_update = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(specs, specs, state_specs),
                                         out_specs=(specs, state_specs)))
  for want in single():
    grads = jax.jit(jax.grad(loss_fn))(params, x, y)
    params, state = sharded_update(params, grads, state)
    _close((params, state.v, state.gamma), (want[0], want[1].v, want[1].gamma))


def _state_specs(state, specs):
  masked = lambda tree: jax.tree.map(lambda x, s: x if isinstance(x, optax.MaskedNode) else s,
                                     tree, specs, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return jax.tree.map(lambda _: P(), state)._replace(
      momentum=specs, v=masked(state.v), gamma=masked(state.gamma), entry=P())


def test_shard_map_refuses_a_split_member_axis():
  mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  specs = SPECS["member_axis"]
  opt = make_opt(param_specs=specs)
  params = init_params()
  state = opt.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  fn = jax.shard_map(lambda p, g, s: opt.update(g, s, p)[0], mesh=mesh,
                     in_specs=(specs, specs, _state_specs(state, specs)), out_specs=specs)
  with pytest.raises(ValueError, match="conv/kernel.*axis 3.*'chan'"):
    jax.jit(fn)(params, grads, state)
  # A leaf whose slices only enter a class's norms may not be split inside shard_map.
  specs = dict(SPECS["reduced_axes"], head={"kernel": P(None, "d"), "bias": P()})
  opt = make_opt(param_specs=specs)
  fn = jax.shard_map(lambda p, g, s: opt.update(g, s, p)[0], mesh=mesh,
                     in_specs=(specs, specs, _state_specs(state, specs)), out_specs=specs)
  with pytest.raises(ValueError, match="head/kernel.*norms of \\['chan'\\]"):
    jax.jit(fn)(params, grads, state)


def test_orbax_resume_continues_the_path(tmp_path):
  import orbax.checkpoint as ocp
  opt, (x, y) = make_opt(), batch()
  params = init_params()
  state = opt.init(params)
  step = jax.jit(functools.partial(train_step, opt))
  for _ in range(2):
    params, state = step(params, state, x, y)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", (params, state))
  fresh = make_opt().init(init_params())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          (init_params(), fresh))
  with ocp.StandardCheckpointer() as ckpt:
    params, state = ckpt.restore(tmp_path / "ckpt", abstract)
  assert state.penalty["norm"]["scale"].shared == "chan"
  for _ in range(STEPS - 2):
    params, state = step(params, state, x, y)
  want = single()[-1]
  _close((params, state.v, state.entry), (want[0], want[1].v, want[1].entry))


def test_nnx_optimizer_sees_user_paths_and_a_class_penalty():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(4, 6, rngs=rngs)
      self.bn = nnx.BatchNorm(6, rngs=rngs)
      self.fc2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.bn(self.fc1(x))))

  seen = []

  def rest(path, leaf):  # a path-based rule, as a user writes it
    seen.append(sl.penalties.path_str(path))
    return sl.Lasso() if path[-1].key == "kernel" else None

  neurons = sl.GroupClass("fc1", 6, (("fc1/kernel", 1), ("fc1/bias", 0), ("bn/scale", 0),
                                     ("bn/bias", 0)), lam=0.05)
  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, sl.splitlbi(0.1, penalty=sl.ChannelGroups((neurons,), rest=rest)),
                      wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  for _ in range(3):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)
  assert "fc2/kernel" in seen and not any(s.endswith("/value") for s in seen)
  report = sl.sparsity_report(opt.opt_state)
  assert set(report["layers"]) == {"fc1/kernel", "fc1/bias", "bn/scale", "bn/bias", "fc2/kernel"}
  assert report["classes"]["fc1"]["groups"] == 6
