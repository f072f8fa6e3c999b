"""Models of examples/models.py: shapes, parameter counts against hand-derived /
published numbers, HWIO kernels (so the default penalty groups filters)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_splitlbi as slbi
from optax_splitlbi.penalties import path_str
from examples import models


def _shapes(name, input_shape, num_classes=10, **kw):
  model = models.get_model(name, num_classes, **kw)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False))
  flat = {path_str(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  return variables, flat


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _kernel_sizes(flat):
  return [int(np.prod(s)) for k, s in flat.items() if k.endswith("kernel")]


def test_lenet5_parameter_count_by_hand():
  _, flat = _shapes("lenet5", (1, 28, 28, 1))
  # conv 5·5·1·6+6, conv 5·5·6·16+16, fc 400·120+120, 120·84+84, 84·10+10
  expected = (25 * 6 + 6) + (25 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
  assert sum(int(np.prod(s)) for s in flat.values()) == expected
  assert flat["Conv_0/kernel"] == (5, 5, 1, 6)  # HWIO


@pytest.mark.parametrize("name,table", [
    ("lenet3", [235200, 30000, 1000]),                                   # paper Table 7
    ("conv2", [576, 36864, 3211264, 65536, 2560]),                       # paper Table 8
    ("conv4", [576, 36864, 73728, 147456, 1605632, 65536, 2560]),        # paper Table 9
])
def test_appendix_d_layer_sizes_match_paper_tables(name, table):
  _, flat = _shapes(name, (1, 28, 28, 1))
  assert _kernel_sizes(flat) == table


def _resnet20_by_hand(width=16, classes=10):
  w = [width, 2 * width, 4 * width]
  n = 3 * 3 * 3 * w[0] + 2 * w[0]                      # stem conv + BN
  cin = w[0]
  for c in w:
    for b in range(3):
      n += 9 * cin * c + 9 * c * c + 4 * c               # two convs + two BNs
      if cin != c:
        n += cin * c + 2 * c                             # 1x1 projection + BN
      cin = c
  return n + cin * classes + classes


def test_resnet20_and_56_parameter_counts():
  v, flat = _shapes("resnet20", (1, 32, 32, 3))
  assert _count(v["params"]) == _resnet20_by_hand()
  assert sum(1 for s in flat.values() if len(s) == 4) == 19 + 2  # 19 convs + 2 projections
  v56, flat56 = _shapes("resnet56", (1, 32, 32, 3))
  assert sum(1 for s in flat56.values() if len(s) == 4) == 55 + 2


def test_imagenet_resnets_match_torchvision_counts():
  # torchvision: resnet18 11,689,512 and resnet50 25,557,032 parameters (1000 classes);
  # BatchNorm scale+bias are params here too, running stats are batch_stats.
  v18, _ = _shapes("resnet18", (1, 64, 64, 3), 1000)
  v50, _ = _shapes("resnet50", (1, 64, 64, 3), 1000)
  assert _count(v18["params"]) == 11_689_512
  assert _count(v50["params"]) == 25_557_032
  assert jax.tree.leaves(v18["batch_stats"])


def test_vgg16_bn_count_by_hand():
  v, flat = _shapes("vgg16", (1, 32, 32, 3))
  cfg = [c for c in models.VGG16_CFG if c != "M"]
  n, cin = 0, 3
  for c in cfg:
    n += 9 * cin * c + 2 * c
    cin = c
  assert _count(v["params"]) == n + 512 * 10 + 10
  assert sum(1 for s in flat.values() if len(s) == 4) == 13


def test_default_penalty_groups_conv_filters_hwio():
  variables, flat = _shapes("digits_cnn", (1, 8, 8, 1))
  pen = slbi.splitlbi(0.1).init(variables["params"]).penalty
  conv = pen["Conv_0"]["kernel"]
  assert conv.kind == "group" and conv.reduce_axes == (0, 1, 2)
  assert pen["Dense_0"]["kernel"].kind == "lasso"
  assert pen["Conv_0"]["bias"] is None


@pytest.mark.parametrize("name,shape,kw", [
    ("digits_cnn", (3, 8, 8, 1), {}),
    ("lenet5", (3, 28, 28, 1), {}),
    ("resnet20", (3, 8, 8, 3), {"width": 2}),
])
def test_forward_and_batch_stats_update(name, shape, kw):
  # (ResNet-20 / ResNet-18 forward and train steps run in test_examples_train.)
  model = models.get_model(name, 7, **kw)
  x = jax.random.normal(jax.random.key(1), shape)

  @jax.jit
  def run(x):  # one compilation: init, eval forward, train forward
    variables = model.init(jax.random.key(0, impl="rbg"), x, train=False)  # fast compile
    logits = model.apply(variables, x, train=False)
    if "batch_stats" not in variables:
      return variables, logits, None
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables, logits, upd["batch_stats"]

  variables, logits, new_stats = run(x)
  assert logits.shape == (shape[0], 7) and bool(jnp.all(jnp.isfinite(logits)))
  assert models.has_batch_norm(variables) == (name == "resnet20")
  if new_stats is not None:
    before = jax.tree.leaves(variables["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(new_stats)))


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown model 'lenet6'"):
    models.get_model("lenet6")
