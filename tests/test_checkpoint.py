"""Checkpointing the SplitLBI state with orbax-checkpoint (issue 5).

The raw optimizer state (Γ, V, momentum, path records, κ and thresholds, and
the leaf-less static LeafPenalty layout nodes, which live in the treedef)
saves and restores with plain orbax, given an abstract target from
``jax.eval_shape``; sharded, unsharded and resharded on restore. A run
interrupted, checkpointed and resumed is bit-identical to an uninterrupted one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_splitlbi as sl

STEPS, SAVE_AT = 6, 3


def init_params():
  """NumPy-initialised (eager jax.random costs seconds of small compiles)."""
  rng = np.random.default_rng(0)
  return {"conv": {"kernel": (0.3 * rng.normal(size=(3, 3, 4, 8))).astype(np.float32),
                   "bias": np.zeros(8, np.float32)},
          "out": {"kernel": (0.5 * rng.normal(size=(8, 8))).astype(np.float32),
                  "bias": np.zeros(8, np.float32)}}


def make_opt():
  # A chain (as users build it), the path records on, per-leaf λ.
  return optax.chain(
      optax.clip_by_global_norm(10.0),
      sl.splitlbi(0.1, nu=1.0, lam=0.2, weight_decay=1e-3, record_path=True,
                  penalty=sl.by_ndim({4: sl.conv_filters(0.5), 2: sl.Lasso()})))


def batch(step):
  """The batch of a step: a pure function of the step index (resumable data)."""
  rng = np.random.default_rng([1, step])
  return (rng.normal(size=(8, 4, 4, 4)).astype(np.float32),
          rng.integers(0, 8, size=8).astype(np.int32))


def loss_fn(params, x, y):
  h = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(h + params["conv"]["bias"]).mean((1, 2))
  logits = h @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.lru_cache(maxsize=None)
def make_step():
  opt = make_opt()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def train(params, opt_state, start, stop, data_sharding=None):
  step = make_step()
  for k in range(start, stop):
    x, y = batch(k)
    if data_sharding is not None:
      x, y = jax.device_put((x, y), data_sharding)
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


def assert_bit_identical(a, b):
  """Same treedef (static penalty / hyperparameter nodes included) and leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def trained_state():
  params = init_params()
  return train(params, make_opt().init(params), 0, SAVE_AT)


def test_raw_state_roundtrip_unsharded(tmp_path):
  params, opt_state = trained_state()
  tree = {"params": params, "opt_state": opt_state}
  host = jax.device_get(tree)
  state = sl.find_state(opt_state)
  # The path records are real data: some groups / entries have entered.
  assert (np.asarray(state.entry["conv"]["kernel"]) > 0).any()
  assert (np.asarray(state.entry["out"]["kernel"]) == -1).any()

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", tree)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
  assert_bit_identical(restored, host)
  got = sl.find_state(restored["opt_state"])
  assert got.penalty == state.penalty
  assert isinstance(got.v["conv"]["bias"], optax.MaskedNode)
  # Masks read from the restored state are the saved ones.
  for a, b in zip(jax.tree.leaves(sl.support(restored["opt_state"])),
                  jax.tree.leaves(sl.support(host["opt_state"]))):
    np.testing.assert_array_equal(a, b)


def _fsdp(mesh, tree):
  """Shards every leaf on its last axis if it divides 8, else replicates."""
  def sharding(x):
    spec = P(*([None] * (x.ndim - 1) + ["x"])) if x.ndim and x.shape[-1] % 8 == 0 else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(sharding, tree)


def test_sharded_save_restore_onto_given_sharding(tmp_path):
  """Save an 8-way sharded state; restore it replicated, sharded on another
  axis, and on one device: values bit-identical, shardings as asked."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  params, opt_state = trained_state()
  tree = jax.device_put({"params": params, "opt_state": opt_state},
                        _fsdp(mesh, {"params": params, "opt_state": opt_state}))
  assert tree["opt_state"][1].v["conv"]["kernel"].sharding.spec == P(None, None, None, "x")
  host = jax.device_get(tree)
  abstract = jax.eval_shape(lambda: tree)
  targets = {
      "replicated": jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract),
      "first_axis": jax.tree.map(
          lambda a: NamedSharding(mesh, P("x") if a.ndim and a.shape[0] % 8 == 0 else P()),
          abstract),
      "one_device": jax.tree.map(
          lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[3]), abstract),
  }
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", tree)
    ckptr.wait_until_finished()
    for name, shardings in targets.items():
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
      restored = ckptr.restore(tmp_path / "ckpt", target)
      assert_bit_identical(restored, host)
      for leaf, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim), name


@pytest.mark.parametrize("layout", ["one_device", "fsdp_8_devices"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, layout):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  data_sharding = NamedSharding(mesh, P("x")) if layout != "one_device" else None

  def fresh():
    params = init_params()
    if layout != "one_device":
      params = jax.device_put(params, _fsdp(mesh, params))
    return params, make_opt().init(params)

  # Uninterrupted run.
  want = jax.device_get(train(*fresh(), 0, STEPS, data_sharding))

  # Interrupted run: train, checkpoint at SAVE_AT, forget everything.
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
    params, opt_state = train(*fresh(), 0, SAVE_AT, data_sharding)
    mngr.save(SAVE_AT, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    mngr.wait_until_finished()
  del params, opt_state

  # Resume in a new manager from an abstract target (shapes, dtypes and the
  # shardings of a freshly initialised run; eval_shape allocates nothing).
  abstract = jax.eval_shape(lambda: dict(zip(("params", "opt_state"), fresh())))
  if layout != "one_device":
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, _fsdp(mesh, abstract))
  with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
    assert mngr.latest_step() == SAVE_AT
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
  got = jax.device_get(train(restored["params"], restored["opt_state"], SAVE_AT, STEPS,
                             data_sharding))
  assert_bit_identical(got, want)
  assert int(sl.find_state(got[1]).count) == STEPS
