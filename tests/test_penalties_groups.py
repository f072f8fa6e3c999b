"""Group specs beyond conv filters give the hand-computed groups (issue: structures).

Each spec is checked three ways: the resolved reduce axes / group size, the
per-group norms and prox on hand-made values, and, end to end, that a loss
touching one group only makes exactly that group enter supp(Γ).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_splitlbi as osl
from optax_splitlbi.penalties import resolve_penalties
from optax_splitlbi.prox import group_norms, prox


def _resolve(spec, shape):
  """The leaf's group layout (:class:`LeafPenalty`) under ``spec``."""
  return resolve_penalties({"w": spec}, {"w": jnp.zeros(shape)})["w"].layout


def _prox(v, spec, lam):
  r = resolve_penalties({"w": spec}, {"w": v})["w"]
  return prox(v, r.layout, r.threshold(lam))


@pytest.mark.parametrize("spec,shape,axes,size", [
    (osl.conv_filters(), (3, 3, 2, 4), (0, 1, 2), 18),
    (osl.conv_input_channels(), (3, 3, 2, 4), (0, 1, 3), 36),
    (osl.dense_neurons(), (5, 3), (0,), 5),
    (osl.dense_inputs(), (5, 3), (1,), 3),
    (osl.attention_heads(), (4, 3, 2), (0, 2), 8),
    (osl.attention_heads(head_axis=-2), (4, 3, 2), (0, 2), 8),
    (osl.attention_heads(head_axis=2), (4, 3, 2), (0, 1), 12),
    (osl.GroupLasso(reduce_axes=(-1,)), (5, 3), (1,), 3),
    (osl.GroupLasso(reduce_axes=(0, -1)), (2, 3, 4), (0, 2), 8),
    (osl.GroupLasso(), (2, 3, 4), (0, 1), 6),
])
def test_resolved_axes_and_group_size(spec, shape, axes, size):
  pe = _resolve(spec, shape)
  assert pe.kind == "group"
  assert pe.reduce_axes == axes
  assert pe.group_size == size


def test_bad_axes_name_the_leaf():
  with pytest.raises(ValueError, match="'w'.*out of range"):
    _resolve(osl.GroupLasso(reduce_axes=(2,)), (5, 3))
  with pytest.raises(ValueError, match="'w'.*out of range"):
    _resolve(osl.attention_heads(head_axis=3), (4, 3, 2))


def test_input_channel_groups_norms_and_prox_by_hand():
  # (kh, kw, cin, cout) = (2, 2, 3, 4): channel c holds 16 entries.
  v = np.zeros((2, 2, 3, 4), np.float32)
  v[:, :, 0, :] = 0.25   # ‖·‖ = √16·0.25 = 1
  v[:, :, 1, :] = 0.5    # 2
  v[0, 0, 2, 0] = -3.0   # 3 (a single entry)
  pe = _resolve(osl.conv_input_channels(), v.shape)
  n = group_norms(jnp.asarray(v), pe.reduce_axes)
  assert n.shape == (1, 1, 3, 1)
  np.testing.assert_allclose(np.ravel(n), [1.0, 2.0, 3.0], rtol=1e-6)
  # λ = 1.5: channel 0 (norm 1) → 0; channel 1 scaled by 1 − 1.5/2 = 1/4; channel 2 by 1/2.
  out = np.asarray(_prox(jnp.asarray(v), osl.conv_input_channels(), 1.5))
  want = np.zeros_like(v)
  want[:, :, 1, :] = 0.125
  want[0, 0, 2, 0] = -1.5
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_dense_neuron_and_input_groups_by_hand():
  v = np.array([[3.0, 0.0, 1.0],
                [4.0, 0.0, 0.0]], np.float32)      # columns: norms 5, 0, 1; rows: √10, 4
  neurons = _resolve(osl.dense_neurons(), v.shape)
  np.testing.assert_allclose(np.ravel(group_norms(jnp.asarray(v), neurons.reduce_axes)),
                             [5.0, 0.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(_prox(jnp.asarray(v), osl.dense_neurons(), 2.0),
                             [[1.8, 0.0, 0.0], [2.4, 0.0, 0.0]], rtol=1e-6)  # 5 → ×0.6
  inputs = _resolve(osl.dense_inputs(), v.shape)
  np.testing.assert_allclose(np.ravel(group_norms(jnp.asarray(v), inputs.reduce_axes)),
                             [math.sqrt(10), 4.0], rtol=1e-6)
  np.testing.assert_allclose(_prox(jnp.asarray(v), osl.dense_inputs(), 2.0),
                             [[3 * (1 - 2 / math.sqrt(10)), 0, 1 - 2 / math.sqrt(10)],
                              [2.0, 0.0, 0.0]], rtol=1e-5)


def test_attention_head_groups_and_normalized_threshold():
  v = np.zeros((4, 3, 2), np.float32)   # (d_model, heads, head_dim)
  v[:, 0, :] = 1.0                      # head 0: √8
  v[1, 2, 1] = 2.0                      # head 2: 2
  spec = osl.attention_heads(lam=0.5, normalized=True)
  pe = _resolve(spec, v.shape)
  np.testing.assert_allclose(np.ravel(group_norms(jnp.asarray(v), pe.reduce_axes)),
                             [math.sqrt(8), 0.0, 2.0], rtol=1e-6)
  # Threshold λ√d = 0.5·√8 = √2: head 0 scaled 1 − √2/√8 = 1/2, head 2 by 1 − √2/2.
  resolved = resolve_penalties({"w": spec}, {"w": jnp.asarray(v)})["w"]
  assert resolved.threshold(1.0) == pytest.approx(math.sqrt(2))
  out = np.asarray(_prox(jnp.asarray(v), spec, 1.0))
  want = np.zeros_like(v)
  want[:, 0, :] = 0.5
  want[1, 2, 1] = 2.0 * (1 - math.sqrt(2) / 2)
  np.testing.assert_allclose(out, want, rtol=1e-6)


CASES = {  # name: (spec, shape, the slice the loss touches, the group it lies in)
    "neurons": (osl.dense_neurons(), (3, 4), (slice(None), 2), (slice(None), 2)),
    "inputs": (osl.dense_inputs(), (3, 4), (1, 0), (1, slice(None))),
    "in_channels": (osl.conv_input_channels(), (1, 1, 3, 2), (0, 0, 1, 1),
                    (slice(None), slice(None), 1)),
    "heads": (osl.attention_heads(), (2, 3, 2), (0, 2, 1), (slice(None), 2, slice(None))),
}


def test_one_touched_group_enters_alone():
  # A loss on one slice of each leaf: exactly the group holding it (and all of its
  # entries) enters supp Γ; leaves are independent, so one run checks all specs.
  params = {k: jnp.zeros(shape) for k, (_, shape, _, _) in CASES.items()}
  opt = osl.splitlbi(0.5, nu=1.0, lam=1.0, penalty={k: c[0] for k, c in CASES.items()},
                     record_path=True)

  def loss(p):
    return -5.0 * sum(jnp.sum(p[k][touch]) for k, (_, _, touch, _) in CASES.items())

  def step(carry, _):
    p, s = carry
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  (_, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=10))(
      (params, opt.init(params)))
  support = osl.support(state)
  entry = osl.entry_steps(state)
  for k, (spec, shape, _, group) in CASES.items():
    want = np.zeros(shape, bool)
    want[group] = True
    np.testing.assert_array_equal(support[k], want, err_msg=k)
    e = np.asarray(entry[k])
    assert e.shape == tuple(1 if a in _resolve(spec, shape).reduce_axes else n
                            for a, n in enumerate(shape)), k
    assert (e > 0).sum() == 1 and (e == -1).sum() == e.size - 1, k
