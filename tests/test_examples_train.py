"""The example train loop end to end: digits, SGD baseline, resume, data parallelism
on 8 CPU devices, CIFAR-10 / ImageNet on mock data, lottery masks, CLI, plots."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import optax_splitlbi as slbi
from optax_splitlbi.penalties import path_str
from examples import configs, input_pipeline, models, plots, reports, train

QUICK = dict(progress=False)


def _digits(**kw):
  return configs.get_config("digits").replace(**QUICK, **kw)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits"))
  result = train.train_and_evaluate(_digits(epochs=6, decay_every=100), workdir, verbose=False)
  return workdir, result


def _np_support_masks(state):
  """supp Γ per penalized leaf, from Γ itself in NumPy (independent of masks.py)."""
  s = slbi.find_state(state.opt_state)
  paths, treedef = jax.tree_util.tree_flatten_with_path(state.params)
  pens = treedef.flatten_up_to(s.penalty)
  gams = treedef.flatten_up_to(s.gamma)
  out = {}
  for (p, w), pe, g in zip(paths, pens, gams):
    if pe is None:
      continue
    g = np.asarray(g)
    if pe.kind == "lasso":
      out[path_str(p)] = g != 0
    else:  # one group per output filter: norms over all axes but the last
      norms = np.sqrt((g.reshape(-1, g.shape[-1]) ** 2).sum(0))
      out[path_str(p)] = np.broadcast_to(norms > 0, g.shape)
  return out


def test_digits_end_to_end_dense_sparse_and_sparsity(digits_run):
  workdir, r = digits_run
  assert r["epoch"] == 6 and len(r["history"]) == 6
  assert r["test_accuracy"] > 0.8  # chance is 0.1
  assert 0.0 < r["weight_density"] < 1.0
  # Per-layer report equals counts of Γ's support computed here in NumPy.
  masks = _np_support_masks(r["state"])
  assert set(r["sparsity"]["layers"]) == set(masks)
  for name, m in masks.items():
    assert r["sparsity"]["layers"][name]["nonzero_weights"] == int(m.sum()), name
  total = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
  assert r["weight_density"] == pytest.approx(total)
  # The sparse accuracy is the accuracy of W ∘ 1[Γ≠0], recomputed here.
  _, test, _ = input_pipeline.create_datasets("digits")
  b = next(test.eval_batches(360))
  params = jax.tree_util.tree_map_with_path(
      lambda p, w: np.where(masks[path_str(p)], w, 0) if path_str(p) in masks else w,
      jax.device_get(r["state"].params))
  logits = models.get_model("digits_cnn", 10).apply({"params": params}, b["image"], train=False)
  acc = float(np.mean(np.argmax(logits, -1) == b["label"]))
  assert r["sparse_test_accuracy"] == pytest.approx(acc, abs=1e-6)
  # Files: one metrics row per epoch, per-filter norms for epochs 0..6.
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [x["epoch"] for x in rows] == list(range(1, 7))
  assert open(os.path.join(workdir, "metrics.csv")).readline().startswith("epoch,lr,")
  with np.load(os.path.join(workdir, "norms.npz")) as f:
    assert f["gamma/Conv_0/kernel"].shape == (7, 16)
    np.testing.assert_array_equal(f["gamma/Conv_0/kernel"][0], 0)  # Γ₀ = 0


def test_plots_write_pngs(digits_run, tmp_path):
  workdir, _ = digits_run
  sgd_dir = str(tmp_path / "sgd")
  train.train_and_evaluate(configs.get_config("digits_sgd").replace(
      **QUICK, epochs=2, max_steps_per_epoch=4), sgd_dir, verbose=False)
  written = plots.main([workdir, "--compare", sgd_dir, "--out", str(tmp_path / "png")])
  names = sorted(os.path.basename(w) for w in written)
  assert names == ["comparison.png", "curves.png", "solution_path.png"]
  for w in written:
    with open(w, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sgd_baseline_learns_and_has_no_sparse_model():
  r = train.train_and_evaluate(configs.get_config("digits_sgd").replace(**QUICK, epochs=3),
                               None, verbose=False)
  assert r["test_accuracy"] > 0.6
  assert "sparse_test_accuracy" not in r and r["sparsity"] is None


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
  cfg = _digits(epochs=4, max_steps_per_epoch=6, decay_every=3)
  full = train.train_and_evaluate(cfg, str(tmp_path / "a"), verbose=False)
  train.train_and_evaluate(cfg.replace(epochs=2), str(tmp_path / "b"), verbose=False)
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "b"), verbose=False)
  assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
  for a, b in zip(full["history"], resumed["history"]):
    for k in ("train_loss", "test_accuracy", "sparse_test_accuracy", "weight_density", "lr"):
      assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["epoch"], k)
  for x, y in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  # The leaf-less static parts of the SplitLBI state come back from the abstract target.
  a, b = slbi.find_state(full["state"].opt_state), slbi.find_state(resumed["state"].opt_state)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert b.penalty == a.penalty
  assert b.penalty["Conv_0"]["kernel"].reduce_axes == (0, 1, 2)
  with np.load(tmp_path / "b" / "norms.npz") as f:
    assert f["gamma/Conv_1/kernel"].shape[0] == 5  # epochs 0..4, no duplicates


def test_data_parallel_8_devices_matches_1_device():
  assert jax.device_count() == 8
  cfg = _digits(model="resnet20", model_kwargs=(("width", 2), ("blocks_per_stage", 1)),
                epochs=1, batch_size=32, max_steps_per_epoch=4, eval_batch_size=120,
                record_norms=False)
  one = train.train_and_evaluate(cfg.replace(num_devices=1), None, verbose=False)
  eight = train.train_and_evaluate(cfg.replace(num_devices=8), None, verbose=False)
  p8 = eight["state"].params
  assert p8["Conv_0"]["kernel"].sharding.is_fully_replicated
  assert len(p8["Conv_0"]["kernel"].sharding.device_set) == 8
  for x, y in zip(jax.tree.leaves(one["state"]), jax.tree.leaves(eight["state"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5)
  assert one["train_loss"] == pytest.approx(eight["train_loss"], rel=1e-4)
  assert one["test_accuracy"] == pytest.approx(eight["test_accuracy"], abs=1 / 120 + 1e-9)


def test_cifar10_resnet_and_imagenet_resnet_steps_on_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    cifar = configs.get_config("resnet20_cifar10").replace(
        **QUICK, model_kwargs=(("width", 4), ("blocks_per_stage", 1)), epochs=1,
        batch_size=8, max_steps_per_epoch=2, eval_batch_size=8)
    r = train.train_and_evaluate(cifar, str(tmp_path / "cifar"), verbose=False)
    assert np.isfinite(r["train_loss"]) and 0 <= r["sparse_test_accuracy"] <= 1
    assert "Conv_0/kernel" in r["sparsity"]["layers"]
    assert os.path.isdir(tmp_path / "cifar" / "checkpoints" / "1")
    imnet = configs.get_config("resnet18_imagenet").replace(
        **QUICK, image_size=32, model_kwargs=(("width", 4), ("stage_sizes", (1, 1, 1, 1))),
        epochs=1, batch_size=8, max_steps_per_epoch=1, eval_batch_size=8)
    r = train.train_and_evaluate(imnet, None, verbose=False)
    assert np.isfinite(r["train_loss"]) and r["history"][0]["lr"] == pytest.approx(0.1)
    assert r["state"].params["Dense_0"]["kernel"].shape == (32, 1000)


def test_lottery_masks_and_retraining_from_the_rewound_init(tmp_path):
  search = _digits(epochs=3, save_masks_at=(3,), save_params_at=(0,), max_steps_per_epoch=10,
                   record_norms=False)
  s = train.train_and_evaluate(search, str(tmp_path / "search"), verbose=False)
  mask_file = tmp_path / "search" / "masks" / "epoch_0003.npz"
  init_file = tmp_path / "search" / "snapshots" / "epoch_0000.npz"
  expected = _np_support_masks(s["state"])
  with np.load(mask_file) as f:
    assert set(f.files) == set(expected)
    for k in f.files:
      np.testing.assert_array_equal(f[k], expected[k])
  # The epoch-0 snapshot is the initialisation of the same seed.
  init = models.get_model("digits_cnn", 10).init(
      jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  with np.load(init_file) as f:
    np.testing.assert_allclose(f["params/Conv_0/kernel"], init["Conv_0"]["kernel"], rtol=1e-5)
  retrain = _digits(optimizer="sgd", epochs=1, max_steps_per_epoch=10, mask_from=str(mask_file),
                    init_from=str(init_file))
  r = train.train_and_evaluate(retrain, None, verbose=False)
  flat = {path_str(p): np.asarray(w)
          for p, w in jax.tree_util.tree_flatten_with_path(r["state"].params)[0]}
  for k, m in expected.items():
    assert not np.any(flat[k][~m]), k  # pruned weights stay exactly zero
  dens = sum(int(m.sum()) for m in expected.values()) / sum(m.size for m in expected.values())
  assert r["weight_density"] == pytest.approx(dens)


def test_cli(capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    train.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--config" in out and "--workdir" in out and "--set" in out
  train.main(["--list"])
  out = capsys.readouterr().out
  for name in ("digits", "lenet_mnist/sgd_mom_wd", "resnet20_cifar10/adam",
               "resnet18_imagenet/splitlbi_nesterov", "ablation_nu/resnet56/nu2000",
               "ablation_kappa/vgg16/kappa10", "lottery/resnet56/retrain", "rewind/conv4/finetune"):
    assert name in out
  train.main(["--config", "ablation_kappa/vgg16/kappa5", "--show"])
  out = capsys.readouterr().out
  assert "kappa = 5.0" in out and "learning_rate = 0.02" in out and "nu = 100.0" in out
  with pytest.raises(ValueError, match="unknown config field 'epoch'"):
    train.main(["--set", "epoch=3"])
  with pytest.raises(SystemExit) as e:
    train.main(["--config", "resnet20_cifar10", "--set", f"data_dir={tmp_path}"])
  assert e.value.code == 2
  assert "'cifar10'" in capsys.readouterr().err
  r = train.main(["--set", "epochs=1", "max_steps_per_epoch=3", "progress=False"])
  assert "Per-layer sparsity" in capsys.readouterr().out and r["epoch"] == 1


def test_paper_configs():
  c = configs.get_config("resnet18_imagenet/sgd_mom_wd")
  assert (c.optimizer, c.learning_rate, c.momentum, c.weight_decay, c.batch_size) == (
      "sgd", 0.1, 0.9, 1e-4, 256)
  assert configs.get_config("resnet18_imagenet").nu == 1000.0
  assert configs.get_config("lenet_mnist/adam").learning_rate == 1e-3
  for k in (1, 2, 5, 10):  # κα = 0.1
    c = configs.get_config(f"ablation_kappa/resnet56/kappa{k}")
    assert c.kappa * c.learning_rate == pytest.approx(0.1) and c.nu == 100.0
  sched = train.make_schedule(configs.get_config("ablation_nu/vgg16/nu10"), steps_per_epoch=10)
  assert [float(sched(s)) for s in (0, 799, 800, 1199, 1200)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001])
  sched = train.make_schedule(configs.get_config("lenet_mnist"), steps_per_epoch=10)
  assert [float(sched(s)) for s in (299, 300, 600)] == pytest.approx([0.1, 0.01, 0.001])
  with pytest.raises(ValueError, match="Unknown config"):
    configs.get_config("resnet21_cifar10")


def test_mask_report_counts_parameters_for_the_final_table():
  # A verbose fixed-mask run prints format_report of this report at the end.
  masks = {"Dense_0/kernel": np.array([[True, False], [False, False]])}
  params = {"Dense_0": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}}
  rep = reports.mask_sparsity_report(masks, params)
  assert rep["total"]["params"] == 6 and rep["total"]["weight_density"] == 0.25
  assert "parameters (all leaves): 6" in slbi.format_report(rep)
