"""optax's contract: state structure, inject_hyperparams, orbax, and optax's contrib battery.

The state's tree structure depends only on the params and the penalty layout:
the same treedef from eager ``init``, ``jax.jit(init)``, ``jax.eval_shape(init)``,
under ``optax.inject_hyperparams`` and for any κ, λ, ν; a checkpoint of one
restores into the others. The last two tests are optax's own contrib tests
(``optax/contrib/_common_test.py``) run on ``splitlbi``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl.testing import parameterized

import optax_splitlbi as sl

KW = dict(learning_rate=0.1, kappa=1.5, nu=2.0, lam=0.3, momentum=0.8, weight_decay=1e-3)


def _params():
  rng = np.random.default_rng(0)
  return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                   "bias": jnp.zeros(4)},
          "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}}


def _grads(params):
  return jax.tree.map(lambda p: 0.5 * p + 0.1, params)


def _inner(state):
  return sl.find_state(state)


def test_same_treedef_for_every_way_of_calling_init():
  params = _params()
  plain = sl.splitlbi(**KW)
  inject = optax.inject_hyperparams(sl.splitlbi)(**KW)
  other_values = sl.splitlbi(0.01, kappa=4.0, nu=500.0, lam=2.0, momentum=0.5,
                             penalty=sl.by_ndim({4: sl.conv_filters(0.7, normalized=True),
                                                 2: sl.Lasso(0.05)}))
  states = {
      "eager": plain.init(params),
      "jit": jax.jit(plain.init)(params),
      "eval_shape": jax.eval_shape(plain.init, params),
      "inject eager": _inner(inject.init(params)),
      "inject jit": _inner(jax.jit(inject.init)(params)),
      "inject eval_shape": _inner(jax.eval_shape(inject.init, params)),
      "other values": other_values.init(params),
      "traced values": jax.jit(lambda k, lam, nu: sl.splitlbi(0.1, kappa=k, lam=lam, nu=nu)
                               .init(params))(2.0, 0.5, 3.0),
      "after update": plain.update(_grads(params), plain.init(params), params)[1],
      "inject after update": _inner(jax.jit(inject.update)(_grads(params),
                                                           inject.init(params), params)[1]),
  }
  want = jax.tree.structure(states["eager"])
  for name, state in states.items():
    assert jax.tree.structure(state) == want, name
  # The structure is not vacuous: a different layout or mode gives another one.
  assert jax.tree.structure(sl.splitlbi(0.1, penalty="lasso").init(params)) != want
  assert jax.tree.structure(sl.splitlbi(0.1, store_gamma=False).init(params)) != want


def test_checkpoint_restores_across_constructions(tmp_path):
  params = _params()
  plain = sl.splitlbi(**KW)
  state = plain.init(params)
  for _ in range(3):
    _, state = plain.update(_grads(params), state, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", state)
    ckptr.wait_until_finished()
    # Restore into the abstract state of the injected optimizer and continue with it.
    inject = optax.inject_hyperparams(sl.splitlbi)(**KW)
    target = jax.eval_shape(inject.init, params)
    inner = ckptr.restore(tmp_path / "ckpt", target.inner_state)
    other = ckptr.restore(tmp_path / "ckpt", jax.eval_shape(
        sl.splitlbi(0.5, kappa=9.0, nu=1.0, lam=4.0).init, params))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(other)):
    np.testing.assert_array_equal(a, b)
  injected = inject.init(params)._replace(inner_state=inner)
  u1, s1 = plain.update(_grads(params), state, params)
  u2, s2 = jax.jit(inject.update)(_grads(params), injected, params)
  chex.assert_trees_all_close((u1, s1), (u2, s2.inner_state), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# optax/contrib/_common_test.py, run on splitlbi
# ---------------------------------------------------------------------------


def _parabola():
  initial, final = jnp.array([-1.0, 10.0, 1.0]), jnp.array([1.0, -1.0, 1.0])
  return initial, final, jax.value_and_grad(lambda p: jnp.sum((p - final) ** 2))


def _rosenbrock():
  a, b = 1.0, 100.0
  initial, final = jnp.array([0.0, 0.0]), jnp.array([a, a ** 2])
  return initial, final, jax.value_and_grad(
      lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2)


class OptaxContribTest(chex.TestCase):
  """optax's contrib tests; SplitLBI's W converges to a minimizer of L (Γ → W)."""

  @parameterized.named_parameters(
      ("parabola", _parabola, 0.05), ("rosenbrock", _rosenbrock, 1e-3))
  def test_optimizers(self, target, lr):
    opt = sl.splitlbi(lr, nu=1.0, lam=0.1, penalty="lasso")
    initial, final, value_and_grad = target()
    state = opt.init(initial)
    state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op map_params

    @jax.jit
    def run(params, state):
      def body(_, carry):
        params, state = carry
        updates, state = opt.update(value_and_grad(params)[1], state, params)
        return optax.apply_updates(params, updates), state
      return jax.lax.fori_loop(0, 20_000, body, (params, state))

    params, state = run(initial, state)
    chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)
    chex.assert_trees_all_close(sl.gamma(state), final, rtol=3e-2, atol=3e-2)

  @chex.all_variants
  def test_optimizers_can_be_wrapped_in_inject_hyperparams(self):
    kwargs = dict(learning_rate=0.1, nu=2.0, lam=0.5, weight_decay=1e-3)
    opt = sl.splitlbi(**kwargs)
    opt_inject = optax.inject_hyperparams(sl.splitlbi)(**kwargs)
    params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
    state = self.variant(opt.init)(params)
    updates, new_state = self.variant(opt.update)(grads, state, params)
    state_inject = self.variant(opt_inject.init)(params)
    updates_inject, new_state_inject = self.variant(opt_inject.update)(
        grads, state_inject, params)
    chex.assert_trees_all_close(updates_inject, updates, rtol=1e-4)
    chex.assert_trees_all_close(new_state_inject.inner_state, new_state, rtol=1e-4)
