"""The trainer's slimming step: the main job's dense / masked / slim table, and a
lottery run that retrains the slim architecture from scratch."""

import jax
import numpy as np
import pytest

import optax_splitlbi as sl
from examples import configs, input_pipeline, models, reports, train


def _test_set():
  _, test, _ = input_pipeline.create_datasets("digits")
  return next(test.eval_batches(360))


def test_an_empty_supp_slims_to_zero_width_and_a_failed_slimming_is_not_fatal(capsys):
  r = train.main(["--set", "epochs=1", "max_steps_per_epoch=3", "progress=False",
                  "num_devices=1"])
  # After 3 steps supp Γ is empty in every layer: the slim network is its logits' bias.
  out = capsys.readouterr().out
  assert "widths: Conv_0 16→0, Conv_1 32→0, Dense_0 64→0, Dense_1 10→10" in out
  rows = r["slim"]["rows"]
  assert rows["slim"][0] == 10 and rows["slim"][2] == rows["masked"][2]
  # Masks slim cannot use are reported, not fatal.
  bad = reports.slim_and_evaluate(models.get_model("digits_cnn"), r["state"], {"nope": None},
                                  _test_set()["image"][:8], lambda m, v: (0.0, 0.0), r)
  assert "Slimming skipped" in capsys.readouterr().out and "is not a variable" in bad["error"]


def test_main_job_ends_with_the_slim_network(capsys):
  # 15 epochs: supp Γ reaches every layer. One device: no cross-device all-reduce
  # (XLA:CPU aborts one whose 8 threads do not meet within 40 s on a loaded machine).
  r = train.main(["--set", "epochs=15", "progress=False", "num_devices=1"])
  out = capsys.readouterr().out
  assert "Slim network" in out and "FLOPs/example" in out and "widths: Conv_0 16→" in out
  rows = r["slim"]["rows"]
  (pd, fd, ad), (pm, fm, am), (ps, fs, acc) = rows["dense"], rows["masked"], rows["slim"]
  assert (ad, am) == (r["test_accuracy"], r["sparse_test_accuracy"])
  assert pd == 38282 and fm == fd and pm < pd and ps < pd and fs < fd
  for name in ("dense", "masked", "slim"):
    assert f"{name:<8} {rows[name][0]:>11,}" in out
  # The printed slim accuracy is the slim module's, recomputed here.
  batch = _test_set()
  slim_logits = r["slim"]["module"].apply(r["slim"]["variables"], batch["image"], train=False)
  assert acc == pytest.approx(float(np.mean(np.argmax(slim_logits, -1) == batch["label"])))
  # It predicts like W on supp Γ (zero-padded borders may move a few logits).
  sparse = sl.sparse_params(jax.device_get(r["state"].params), r["state"].opt_state)
  masked_logits = models.get_model("digits_cnn").apply({"params": sparse}, batch["image"])
  assert np.mean(np.argmax(slim_logits, -1) == np.argmax(masked_logits, -1)) > 0.97
  assert abs(acc - am) <= 0.02


def test_lottery_retrains_the_slim_architecture_from_scratch(tmp_path):
  base = configs.get_config("digits").replace(progress=False, record_norms=False, slim=False,
                                             num_devices=1,
                                             fc_lam=0.05)  # dense weights enter by epoch 3
  train.train_and_evaluate(base.replace(epochs=3, save_masks_at=(3,)), str(tmp_path / "s"),
                           verbose=False)
  mask_file = tmp_path / "s" / "masks" / "epoch_0003.npz"
  with np.load(mask_file) as f:
    conv0 = int(f["Conv_0/kernel"].any((0, 1, 2)).sum())     # filters in supp Γ
  retrain = base.replace(optimizer="sgd", epochs=1, max_steps_per_epoch=5,
                         mask_from=str(mask_file), retrain_slim=True)
  r = train.train_and_evaluate(retrain, None, verbose=False)
  p = r["state"].params
  assert p["Conv_0"]["kernel"].shape == (3, 3, 1, conv0) and conv0 < 16
  assert p["Conv_1"]["kernel"].shape[2] == conv0
  assert np.isfinite(r["train_loss"]) and "sparsity" in r
  with pytest.raises(ValueError, match="unset init_from"):
    train.train_and_evaluate(retrain.replace(init_from="x.npz"), None, verbose=False)
  assert configs.get_config("lottery/resnet56/retrain_slim").retrain_slim
