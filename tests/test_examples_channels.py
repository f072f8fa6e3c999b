"""The trainer's ``penalty=channels``: cross-leaf groups for every example model."""

import jax
import numpy as np
import pytest

import optax_splitlbi as slbi
from examples import configs, models, train

# (model, input shape, expected classes): the hand count of removable channel spaces.
# digits: 2 convs + 1 hidden dense layer; LeNet-5: 2 convs + 2 hidden; VGG-16: 13 convs;
# ResNet-20 / 56: 3 residual stages (stem included) + the first conv of each block;
# ResNet-18: the stem's 64 channels are stage 1's residual (no projection there), so
# 4 stages + 8 first convs; ResNet-50: the stem (64, read by the first bottleneck's
# 1×1 conv and 1×1 projection to 256) + 4 stages + 2 inner convs × 16 bottlenecks.
CASES = {
    "digits_cnn": ((8, 8, 1), 3),
    "lenet5": ((28, 28, 1), 4),
    "lenet3": ((28, 28, 1), 2),
    "conv4": ((28, 28, 1), 6),
    "vgg16": ((32, 32, 3), 13),
    "resnet20": ((32, 32, 3), 3 + 9),
    "resnet56": ((32, 32, 3), 3 + 27),
    "resnet18": ((64, 64, 3), 4 + 8),
    "resnet50": ((64, 64, 3), 1 + 4 + 32),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_channels_penalty_for_every_example_model(name):
  shape, classes = CASES[name]
  config = configs.Config(model=name, penalty="channels", conv_lam=0.1, normalized=True)
  model = models.get_model(name, 10)
  penalty = train.make_penalty(config, model, shape)
  assert isinstance(penalty, slbi.ChannelGroups)
  assert len(penalty.classes) == classes, [c.name for c in penalty.classes]
  tx = train.make_optimizer(config, 10, model, shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, *shape)),
                                                train=False))
  state = jax.eval_shape(tx.init, variables["params"])
  members = {p for c in penalty.classes for p, _ in c.members}
  # Every conv kernel is a member; BatchNorm scales and shifts too; the classifier is not.
  flat = {slbi.penalties.path_str(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  convs = {p for p, x in flat.items() if x.ndim == 4}
  assert convs <= members
  assert {p for p in flat if "BatchNorm" in p or p.endswith("_bn/scale")} <= members
  last_dense = sorted(p for p in flat if p.startswith("Dense_") and p.endswith("kernel"))[-1]
  assert last_dense not in members
  assert state.penalty is not None


def test_channels_needs_the_model():
  with pytest.raises(ValueError, match="model"):
    train.make_penalty(configs.Config(penalty="channels"))
  with pytest.raises(ValueError, match="penalty"):
    train.make_penalty(configs.Config(penalty="bogus"))


def test_digits_job_with_channels_penalty_slims_with_nothing_kept_back():
  r = train.main(["--set", "penalty=channels", "epochs=5", "progress=False", "num_devices=1",
                  "fc_lam=0.05"])
  rep = r["slim"]["report"]
  assert any(layer["removed"] for layer in rep["layers"].values())
  assert sum(layer["kept_pruned"] for layer in rep["layers"].values()) == 0
  assert all(f["exact"] for f in rep["folds"])
  assert r["slim"]["rows"]["slim"][2] == pytest.approx(r["sparse_test_accuracy"], abs=1e-6)
