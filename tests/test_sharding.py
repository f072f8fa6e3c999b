"""SplitLBI on many devices: jit/GSPMD sharding, shard_map and pmap (issue 5).

The 8 host CPU devices come from tests/conftest.py. Every multi-device run is
compared with the same steps on ONE device; the group norms inside the prox
reduce over whole filters, so a sharded reduced axis gives a different Γ
unless the norm is the global one. A NumPy prox of the gathered V checks Γ
independently of the library.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_splitlbi as sl

LR, KAPPA, NU, STEPS = 0.1, 1.0, 1.0, 4
LAM = {"conv": 0.88, "fc": 0.47, "out": 0.1}  # per leaf: some groups in supp Γ, some out
AXES = {"conv": (0, 1, 2), "fc": (0,)}        # the reduced (in-group) axes
PENALTY = {"conv": {"kernel": sl.conv_filters(LAM["conv"]), "bias": None},
           "fc": {"kernel": sl.dense_neurons(LAM["fc"]), "bias": None},
           "out": {"kernel": sl.Lasso(LAM["out"]), "bias": None}}


def make_opt():
  return sl.splitlbi(LR, kappa=KAPPA, nu=NU, penalty=PENALTY, record_path=True)


def init_params():
  """NumPy-initialised (eager jax.random costs seconds of small compiles)."""
  rng = np.random.default_rng(0)
  normal = lambda scale, shape: (scale * rng.normal(size=shape)).astype(np.float32)
  zeros = lambda n: np.zeros(n, np.float32)
  return {"conv": {"kernel": normal(0.3, (3, 3, 8, 8)), "bias": zeros(8)},
          "fc": {"kernel": normal(0.5, (8, 16)), "bias": zeros(16)},
          "out": {"kernel": normal(0.5, (16, 8)), "bias": zeros(8)}}


def batch():
  rng = np.random.default_rng(1)
  return (rng.normal(size=(16, 5, 5, 8)).astype(np.float32),
          rng.integers(0, 8, size=16).astype(np.int32))


def apply(params, x):
  y = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.nn.relu(y + params["conv"]["bias"]).mean((1, 2))
  y = jax.nn.relu(y @ params["fc"]["kernel"] + params["fc"]["bias"])
  return y @ params["out"]["kernel"] + params["out"]["bias"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def train_step(opt, params, state, x, y):
  grads = jax.grad(loss_fn)(params, x, y)
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def run_single():
  """STEPS steps on one device: the reference."""
  opt, (x, y) = make_opt(), batch()
  params = jax.device_put(init_params(), jax.devices()[0])
  state = opt.init(params)
  step = jax.jit(functools.partial(train_step, opt))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params, state


@functools.lru_cache(maxsize=None)
def single():
  return jax.device_get(run_single())


def np_group_prox(v, reduce_axes, lam, kappa):
  """κ·max(0, 1 − λ/‖V_g‖)·V_g in NumPy (float64), groups over reduce_axes."""
  v = np.asarray(v, np.float64)
  norm = np.sqrt((v ** 2).sum(axis=reduce_axes, keepdims=True))
  return kappa * np.maximum(0.0, 1.0 - lam / np.where(norm > 0, norm, 1.0)) * v


def assert_gamma_is_global_prox(state):
  """Γ = κ·Prox(V) with GLOBAL group norms, recomputed in NumPy from V."""
  for name, axes in AXES.items():
    v = np.asarray(state.v[name]["kernel"])
    np.testing.assert_allclose(np.asarray(state.gamma[name]["kernel"]),
                               np_group_prox(v, axes, LAM[name], KAPPA), rtol=1e-5, atol=1e-7)


def assert_close_to_single(params, state):
  ref_params, ref_state = single()
  chex_tol = dict(rtol=2e-5, atol=2e-6)
  for got, want in zip(jax.tree.leaves((params, state.momentum, state.v, state.gamma)),
                       jax.tree.leaves((ref_params, ref_state.momentum, ref_state.v,
                                        ref_state.gamma))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **chex_tol)
  # Path records and masks are discrete: exactly equal.
  for got, want in zip(jax.tree.leaves(state.entry), jax.tree.leaves(ref_state.entry)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  got_masks = jax.tree.leaves(sl.support(jax.device_get(state)))
  want_masks = jax.tree.leaves(sl.support(ref_state))
  for got, want in zip(got_masks, want_masks):
    np.testing.assert_array_equal(got, want)


def test_reference_run_is_a_nontrivial_path():
  """The single-device run has groups in and out of supp Γ (so shard errors show)."""
  _, state = single()
  assert_gamma_is_global_prox(state)
  for name, axes in AXES.items():
    active = np.asarray(state.entry[name]["kernel"]) > 0
    assert active.any() and not active.all(), (name, state.entry[name]["kernel"])
    # Active groups are shrunk a lot: a local (shard) norm would change Γ.
    v = np.asarray(state.v[name]["kernel"])
    norms = np.sqrt((v.astype(np.float64) ** 2).sum(axis=axes))
    assert (norms[norms > LAM[name]] < 1.5 * LAM[name]).any(), norms
    # No norm sits at the threshold, so masks are robust to float reordering.
    assert np.abs(norms / LAM[name] - 1).min() > 1e-2, norms
  # A local norm is the wrong norm: e.g. 1/8 of a conv filter's input channels.
  v = np.asarray(state.v["conv"]["kernel"])
  local = np_group_prox(v[:, :, :1], (0, 1, 2), LAM["conv"], KAPPA)
  assert not np.allclose(local, np.asarray(state.gamma["conv"]["kernel"])[:, :, :1])


# Params' PartitionSpecs on an 8-device mesh ("x"); data is always split over "x".
# conv kernel is HWIO, groups reduce (0, 1, 2); fc groups reduce axis 0.
LAYOUTS = {
    "replicated": {"conv": P(), "fc": P(), "out": P()},
    "fsdp_filter_axis": {"conv": {"kernel": P(None, None, None, "x"), "bias": P("x")},
                         "fc": {"kernel": P(None, "x"), "bias": P("x")},
                         "out": {"kernel": P("x", None), "bias": P("x")}},
    "sharded_reduced_axis": {"conv": {"kernel": P(None, None, "x", None), "bias": P()},
                             "fc": {"kernel": P("x", None), "bias": P()},
                             "out": {"kernel": P(None, "x"), "bias": P()}},
}


def _broadcast_specs(specs, tree):
  is_spec = lambda s: isinstance(s, P)
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), specs, tree,
                      is_leaf=is_spec)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_jit_sharded_equals_single_device(layout):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  opt, (x, y) = make_opt(), batch()
  specs = _broadcast_specs(LAYOUTS[layout], init_params())
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.device_put(init_params(), shardings)
  data = NamedSharding(mesh, P("x"))
  x, y = jax.device_put(x, data), jax.device_put(y, data)
  state = opt.init(params)
  step = jax.jit(functools.partial(train_step, opt), donate_argnums=(0, 1))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  # The parameters keep their layout; the state lives on the whole mesh.
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert p.sharding.is_equivalent_to(s, p.ndim)
  for leaf in jax.tree.leaves(state):
    assert len(leaf.sharding.device_set) == 8
  host = jax.device_get((params, state))
  assert_close_to_single(*host)
  assert_gamma_is_global_prox(host[1])


def test_explicit_mesh_sharding_in_types():
  """Under an explicit mesh, update(grads, state, params) type-checks with a
  kernel sharded along a REDUCED axis (the prox's sums over it are global)."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  opt = make_opt()
  specs = _broadcast_specs(LAYOUTS["sharded_reduced_axis"], init_params())
  with jax.set_mesh(mesh):
    params = jax.device_put(init_params(), jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    state = opt.init(params)
    updates, new_state = jax.jit(opt.update)(grads, state, params)
    assert jax.typeof(updates["conv"]["kernel"]).sharding.spec == P(None, None, "x", None)
    assert jax.typeof(new_state.v["conv"]["kernel"]).sharding.spec == P(None, None, "x", None)
  # One step from V = Γ = b = 0 with ∇L = W/2: V' = (α/ν)·W, Γ' = κ·Prox(V').
  w = np.asarray(params["conv"]["kernel"], np.float64)
  np.testing.assert_allclose(np.asarray(new_state.v["conv"]["kernel"]), LR / NU * w, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new_state.gamma["conv"]["kernel"]),
                             np_group_prox(LR / NU * w, (0, 1, 2), LAM["conv"], KAPPA),
                             rtol=1e-5, atol=1e-7)


def _per_device(tree):
  """Adds a leading axis so out_specs=P('x') returns every device's copy."""
  return jax.tree.map(lambda a: a[None], tree)


def _assert_all_devices_equal_and_single(stacked_params, stacked_state):
  """Rows (devices) are bit-identical, and row 0 matches the 1-device run."""
  for leaf in jax.tree.leaves((stacked_params, stacked_state)):
    leaf = np.asarray(leaf)
    for d in range(1, leaf.shape[0]):
      np.testing.assert_array_equal(leaf[d], leaf[0])
  row0 = jax.tree.map(lambda a: np.asarray(a)[0], (stacked_params, stacked_state))
  assert_close_to_single(*row0)
  # Masks read from every device's state agree.
  for d in range(1, 8):
    row = jax.tree.map(lambda a: np.asarray(a)[d], stacked_state)
    for a, b in zip(jax.tree.leaves(sl.support(row)), jax.tree.leaves(sl.support(row0[1]))):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("check_vma", [False, True])
def test_shard_map_data_parallel_identical_on_every_device(check_vma):
  """Replicated params, batch split over 8 devices, gradients averaged.

  check_vma=False: classic SPMD, local gradients are lax.pmean-ed.
  check_vma=True (default): the gradient w.r.t. replicated params is psum-ed
  by autodiff itself, so the loss is lax.pmean-ed instead of the gradients.
  """
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  opt, (x, y) = make_opt(), batch()

  def grad_fn(params, x, y):
    if check_vma:
      return jax.grad(lambda p: jax.lax.pmean(loss_fn(p, x, y), "x"))(params)
    return jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "x")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("x"), P("x")),
                     out_specs=P("x"), check_vma=check_vma)
  def run(params, x, y):
    def body(_, carry):
      params, state = carry
      updates, state = opt.update(grad_fn(params, x, y), state, params)
      return optax.apply_updates(params, updates), state
    return _per_device(jax.lax.fori_loop(0, STEPS, body, (params, opt.init(params))))

  _assert_all_devices_equal_and_single(*jax.device_get(run(init_params(), x, y)))


def test_shard_map_fsdp_on_filter_axis():
  """FSDP under shard_map: kernels split on their group-INDEX axis (conv output
  filters, fc neurons); the forward all-gathers them, gradients are
  reduce-scattered. Each device holds whole groups, so local norms are global
  and Γ equals the one-device Γ without any option."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  opt, (x, y) = make_opt(), batch()
  specs = _broadcast_specs(LAYOUTS["fsdp_filter_axis"], init_params())
  # The sharded axis of each leaf (conv: 3, fc: 1, out: 0, biases: 0).
  axis = jax.tree.map(lambda s: s.index("x"), specs, is_leaf=lambda s: isinstance(s, P))

  def gather(params):
    return jax.tree.map(lambda p, a: jax.lax.all_gather(p, "x", axis=a, tiled=True),
                        params, axis)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(specs, P("x"), P("x")),
                     out_specs=(specs, P("x")))
  def run(params, x, y):
    state = opt.init(params)  # on the local shards: no group is split
    for _ in range(STEPS):
      full_grads = jax.grad(lambda p: loss_fn(gather(p), x, y))(params)
      # grad through all_gather is already the psum-scatter of the local
      # gradients; divide by the device count for the mean over the batch.
      grads = jax.tree.map(lambda g: g / 8, full_grads)
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, _per_device(state.entry)

  params, entries = jax.device_get(run(init_params(), x, y))
  ref_params, ref_state = single()
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  # entry is sharded like its kernel: device d holds groups d*n..(d+1)*n.
  conv = np.concatenate(list(entries["conv"]["kernel"]), axis=3)
  np.testing.assert_array_equal(conv, ref_state.entry["conv"]["kernel"])


def test_pmap_data_parallel_identical_on_every_device():
  """pmap (maintenance mode, still used): replicated params, pmean-ed grads."""
  opt, (x, y) = make_opt(), batch()
  n = jax.local_device_count()
  assert n == 8

  @functools.partial(jax.pmap, axis_name="i")
  def run(params, x, y):
    def body(_, carry):
      params, state = carry
      grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "i")
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, STEPS, body, (params, opt.init(params)))

  replicated = jax.tree.map(lambda p: np.broadcast_to(p, (n,) + p.shape), init_params())
  split = lambda a: a.reshape((n, -1) + a.shape[1:])
  _assert_all_devices_equal_and_single(*jax.device_get(run(replicated, split(x), split(y))))


# --- Needs the issue-5 core patch: state sharding follows the params, and
# --- splitlbi(..., param_specs=...) for groups split by shard_map.


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_state_sharding_type_init_matches_update(layout):
  """As optax's sharding_test: jax.typeof of every state leaf (shape, dtype
  and sharding) is the same after init, after update, and under jit."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  opt = make_opt()
  specs = _broadcast_specs(LAYOUTS[layout], init_params())
  with jax.set_mesh(mesh):
    params = jax.device_put(init_params(), jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    state0 = opt.init(params)
    _, state1 = opt.update(params, state0, params)
    state2 = jax.jit(opt.init)(params)
    _, state3 = jax.jit(opt.update)(params, state0, params)
    types = [jax.tree.map(jax.typeof, s) for s in (state0, state1, state2, state3)]
    for t in types[1:]:
      assert t == types[0]
  # The state is laid out like the params: b, V, Γ as the kernel; the path
  # record (keepdims layout) keeps the kernel's sharding on group-index axes.
  t = types[0]
  for name in ("conv", "fc", "out"):
    want = jax.typeof(params[name]["kernel"]).sharding.spec
    for tree in (t.momentum, t.v, t.gamma):
      assert tree[name]["kernel"].sharding.spec == want
  want = {"fsdp_filter_axis": P(None, None, None, "x"), "replicated": P(None, None, None, None),
          "sharded_reduced_axis": P(None, None, None, None)}[layout]
  assert t.entry["conv"]["kernel"].sharding.spec == want


def _spec_of(a):
  return a.sharding.spec if isinstance(a.sharding, NamedSharding) else P()


def _split_reduced_axis_run(param_specs):
  """shard_map: conv kernels split over input channels and fc over inputs,
  i.e. along the axes their groups REDUCE over; returns per-device state."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  opt = sl.splitlbi(LR, kappa=KAPPA, nu=NU, penalty=PENALTY, record_path=True,
                    param_specs=param_specs)
  x, y = batch()
  specs = _broadcast_specs(LAYOUTS["sharded_reduced_axis"], init_params())
  params = jax.device_put(init_params(), jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  state = opt.init(params)  # on the GLOBAL params; the state follows their sharding
  state_specs = jax.tree.map(_spec_of, state)
  axis = jax.tree.map(lambda s: s.index("x") if "x" in s else None, specs,
                      is_leaf=lambda s: isinstance(s, P))

  def gather(params):
    return jax.tree.map(lambda p, a: p if a is None else
                        jax.lax.all_gather(p, "x", axis=a, tiled=True), params, axis)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(specs, state_specs, P("x"), P("x")),
                     out_specs=(specs, P("x")))
  def run(params, state, x, y):
    for _ in range(STEPS):
      loss = lambda p: jax.lax.pmean(loss_fn(gather(p), x, y), "x")
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return params, _per_device(state)

  return jax.device_get(run(params, state, x, y))


def test_shard_map_split_groups_need_param_specs():
  """Inside shard_map the library sees local shards only: a group split over
  devices needs param_specs, which psums the squared group norms."""
  specs = _broadcast_specs(LAYOUTS["sharded_reduced_axis"], init_params())
  params, state = _split_reduced_axis_run(specs)
  ref_params, ref_state = single()
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  gathered = {}
  for name, ax in (("conv", 2), ("fc", 0)):
    for field in ("v", "gamma"):
      per_dev = np.asarray(getattr(state, field)[name]["kernel"])
      full = np.concatenate(list(per_dev), axis=ax)
      np.testing.assert_allclose(full, getattr(ref_state, field)[name]["kernel"],
                                 rtol=2e-5, atol=2e-6)
      gathered[(field, name)] = full
    ent = np.asarray(state.entry[name]["kernel"])  # replicated: identical on all devices
    for d in range(8):
      np.testing.assert_array_equal(ent[d], ref_state.entry[name]["kernel"])
  for name, axes in AXES.items():
    np.testing.assert_allclose(gathered[("gamma", name)],
                               np_group_prox(gathered[("v", name)], axes, LAM[name], KAPPA),
                               rtol=1e-5, atol=1e-7)


def test_shard_map_split_groups_without_param_specs_use_local_norms():
  """The control: without param_specs each device shrinks by its shard's norm,
  and Γ differs from the one-device run (so the test above can fail)."""
  _, state = _split_reduced_axis_run(None)
  _, ref_state = single()
  full = np.concatenate(list(np.asarray(state.gamma["conv"]["kernel"])), axis=2)
  assert not np.allclose(full, ref_state.gamma["conv"]["kernel"], rtol=1e-3, atol=1e-4)


def test_param_specs_errors_are_clear():
  specs = _broadcast_specs(LAYOUTS["sharded_reduced_axis"], init_params())
  opt = sl.splitlbi(LR, penalty=PENALTY, param_specs=specs)
  params = init_params()
  with pytest.raises(ValueError, match="conv/kernel.*shard_map"):
    opt.update(params, opt.init(params), params)  # not inside shard_map
  # init on the local shards (inside shard_map): the group size is wrong.
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(specs,), out_specs=P())
  def local_init(params):
    return opt.update(params, opt.init(params), params)[0]["out"]["bias"]

  with pytest.raises(ValueError, match="conv/kernel: a local group has 9 entries, split 8 ways"):
    local_init(params)
