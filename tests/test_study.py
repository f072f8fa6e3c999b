"""The evidence-study runner (examples/study.py, examples/studies/): control masks,
warm-up, statistics and initialisations against hand values, and a smoke run of the
lottery study (search → masks → controls → retraining) on a small synthetic IDX
directory, rerun to check that finished runs are skipped."""

import dataclasses
import gzip
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import configs, models, study, train
from examples.studies import common, inits, path, pruning, sensitivity


# ------------------------------------------------------------------- control masks


def _reference():
  conv = np.zeros((2, 2, 1, 4), bool)
  conv[..., [1, 3]] = True                     # filters 1 and 3 of 4
  dense = np.zeros((2, 5), bool)
  dense[0, [0, 2]] = dense[1, 4] = True        # 3 of 10 weights
  return {"Conv_0/kernel": conv, "Dense_0/kernel": dense}


def test_random_masks_keep_the_per_layer_counts_and_whole_filters():
  ref = _reference()
  for seed in range(5):
    out = pruning.random_masks(ref, {"Conv_0/kernel"}, np.random.default_rng(seed))
    conv = out["Conv_0/kernel"]
    assert conv.shape == (2, 2, 1, 4) and conv.sum() == 8   # 2 whole filters of 4 weights
    assert all(conv[..., o].all() or not conv[..., o].any() for o in range(4))
    assert out["Dense_0/kernel"].sum() == 3
  # A lasso conv layer (not a filter layer) keeps single weights: 8 of 16.
  out = pruning.random_masks(ref, set(), np.random.default_rng(0))
  assert out["Conv_0/kernel"].sum() == 8


def test_magnitude_masks_keep_the_largest_filters_and_weights():
  ref = _reference()
  conv = np.zeros((2, 2, 1, 4), np.float32)
  conv[..., 0], conv[..., 1], conv[..., 2], conv[..., 3] = 0.1, -0.3, 0.5, 0.2
  dense = np.array([[0.1, -0.9, 0.3, 0.0, 0.05], [0.2, 0.0, -0.4, 0.0, 0.01]], np.float32)
  out = pruning.magnitude_masks(ref, {"Conv_0/kernel": conv, "Dense_0/kernel": dense},
                                {"Conv_0/kernel"})
  # Filter norms 0.2, 0.6, 1.0, 0.4: the two largest are filters 2 and 1.
  np.testing.assert_array_equal(pruning.kept_filters(out["Conv_0/kernel"]),
                                [False, True, True, False])
  # |w| largest three: 0.9, 0.4, 0.3.
  expected = np.zeros((2, 5), bool)
  expected[0, 1] = expected[1, 2] = expected[0, 2] = True
  np.testing.assert_array_equal(out["Dense_0/kernel"], expected)
  assert pruning.layer_densities(out) == {"Conv_0/kernel": 0.5, "Dense_0/kernel": 0.3}
  assert pruning.total_density(out) == pytest.approx(11 / 26)
  with pytest.raises(ValueError, match=r"weights\['Dense_0/kernel'\] is None"):
    pruning.magnitude_masks(ref, {"Conv_0/kernel": conv}, {"Conv_0/kernel"})


# ------------------------------------------------------------- schedule, statistics


def test_warmup_multiplies_the_schedule_and_keeps_the_decay_epochs():
  c = configs.get_config("digits").replace(learning_rate=0.1, schedule="step", decay_every=1,
                                           warmup_steps=4)
  sched = train.make_schedule(c, steps_per_epoch=10)
  assert [float(sched(s)) for s in (0, 1, 3, 9, 10)] == pytest.approx(
      [0.025, 0.05, 0.1, 0.1, 0.01])
  with pytest.raises(ValueError, match="warmup_steps"):
    train.make_schedule(c.replace(warmup_steps=-1), 10)


def test_mean_sd_fmt_and_markdown():
  assert common.mean_sd([0.90, 0.92, 0.94]) == pytest.approx((0.92, 0.02, 3))
  assert common.fmt([0.90, 0.92, 0.94]) == "92.00 ± 2.00"
  assert common.fmt([0.5]) == "50.00 ± 0.00" and common.fmt([]) == "–"
  assert common.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_largest_stable_and_entry_points():
  assert sensitivity.largest_stable({0.5: 0, 1.0: 0, 2.0: 1, 4.0: 0}) == 1.0
  assert sensitivity.largest_stable({0.5: 2, 1.0: 0}) == 0.0
  norms = np.array([[0, 0, 0], [0, 1, 0], [2, 3, 0]], np.float32)
  np.testing.assert_array_equal(path.entry_points(norms), [2, 1, -1])


def test_init_schemes_have_their_variances():
  c = configs.get_config("fashion/lenet5/sgd_mom")
  project = inits.init_params(c, "project", (28, 28, 1))
  direct = models.get_model("lenet5", 10).init(
      jax.random.key(c.seed, impl=c.prng_impl), jnp.zeros((1, 28, 28, 1)), train=False)
  np.testing.assert_array_equal(project["params/Dense_0/kernel"],
                                direct["params"]["Dense_0"]["kernel"])
  for scheme, gain in (("flax", 1.0), ("he", 2.0)):
    w = inits.init_params(c, scheme, (28, 28, 1))["params/Dense_0/kernel"]  # fan_in 400
    assert w.var() == pytest.approx(gain / 400, rel=0.05)
    assert not np.any(inits.init_params(c, scheme, (28, 28, 1))["params/Dense_0/bias"])
  with pytest.raises(ValueError, match="init scheme"):
    inits.init_params(c, "orthogonal", (28, 28, 1))


# ------------------------------------------------------------------ smoke, end to end


def _write_idx(path_, array):
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
  with gzip.open(path_, "wb") as f:
    f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  """A learnable 28×28 IDX dataset: class y is a bright band at rows 2y..2y+5."""
  d = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 320), ("t10k", 80)):
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i in range(n):
      x[i, 2 * y[i]:2 * y[i] + 6] += 150
    _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
    _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y)
  return str(d)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """A fortunes-format corpus (fortunes separated by lines holding ``%``)."""
  d = tmp_path_factory.mktemp("fortunes")
  rng = np.random.default_rng(0)
  words = "the old man read a short book about quiet rivers and tall green hills".split()
  text = "\n%\n".join(" ".join(rng.choice(words, 20)) for _ in range(60))
  (d / "sayings").write_text(text + "\n")
  return str(d)


def test_lottery_smoke_end_to_end_and_resume(idx_dir, tmp_path, capsys):
  out = str(tmp_path / "out")
  written = study.main(["lottery", "--smoke", "--data", f"idx:{idx_dir}", "--out", out])
  assert written == [os.path.join(out, "lottery", "table.md")]
  text = open(written[0]).read()
  assert "retrained: supp Γ" in text and "magnitude" in text and "Compute: 6 runs" in text
  assert os.path.getsize(os.path.join(out, "lottery", "lottery.png")) > 1000
  runs = os.path.join(out, "lottery", "runs")
  load = lambda kind: dict(np.load(os.path.join(  # noqa: E731
      runs, f"retrain/group/epoch1/{kind}/seed0/masks.npz")))
  gamma, rand, mag = load("gamma"), load("random"), load("magnitude")
  for name, g in gamma.items():    # the controls keep as many filters / weights per layer
    assert rand[name].sum() == mag[name].sum() == g.sum(), name
  with open(os.path.join(runs, "retrain/group/epoch1/random/seed0/result.json")) as f:
    result = json.load(f)
  assert result["history"][-1]["weight_density"] == pytest.approx(pruning.total_density(gamma))
  assert result["config"]["init_from"].endswith("search/group/seed0/snapshots/epoch_0000.npz")
  stamp = os.path.getmtime(os.path.join(runs, "dense/seed0/result.json"))
  capsys.readouterr()
  study.main(["lottery", "--smoke", "--data", f"idx:{idx_dir}", "--out", out])
  assert "[1/6]" not in capsys.readouterr().out  # nothing retrained
  assert os.path.getmtime(os.path.join(runs, "dense/seed0/result.json")) == stamp


def test_missing_data_directory_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
    study.main(["table1", "--data", f"idx:{tmp_path}/nowhere", "--out", str(tmp_path)])


ARMS_AND_NARROW = ("dense-adamw", "dense-sgd", "splitlbi-sgd", "splitlbi-adam", "narrow-adamw")


def test_named_settings_pick_a_variant_and_unknown_ones_are_refused():
  from examples.studies import transformers  # pylint: disable=g-import-not-at-top
  s = study.settings_of("transformers", False, None, variant="vit_long")
  assert (s.models, s.arms, s.steps, s.schedule) == (("vit",), ("dense-adamw",), 10000, "cosine")
  keys = [r.key for r in transformers.runs(dataclasses.replace(s, seeds=2), "idx:/x")]
  assert keys == ["vit/dense-adamw/seed0", "vit/dense-adamw/seed1"]
  t = study.settings_of("transformers", False, None, variant="through")
  assert (t.coupling, t.nu, t.gpt_nu, t.adam_lam) == ("momentum", 100.0, 300.0, 3e-4)
  n = study.settings_of("transformers", False, None, variant="narrow")
  assert (n.arms, n.gpt, n.vit) == (("dense-adamw", "narrow-adamw"), t.gpt, t.vit)
  nc = study.settings_of("transformers", False, None, variant="narrow_cosine")
  assert (nc.arms, nc.schedule, nc.stops) == (n.arms, "cosine", n.stops)
  d = study.settings_of("transformers", False, None, variant="dual")
  assert (d.dual, d.coupling, d.nu, d.gpt_nu, d.adam_lam, d.gpt, d.vit) == (
      True, "momentum", 100.0, 300.0, 1.5, t.gpt, t.vit)
  assert d.arms == ("dense-adamw", "narrow-adamw", "splitlbi-adam")
  f = study.settings_of("transformers", False, None, variant="dual_fast")
  assert (f.adam_lr, f.splitlbi_lr, f.adam_lam, f.dual, f.arms) == (3e-3, 6e-3, 3.0, True, d.arms)
  assert [transformers.peak_rate(f, a) for a in ARMS_AND_NARROW] == [3e-3, 0.05, 0.05, 6e-3,
                                                                    3e-3]
  assert transformers.peak_rate(d, "splitlbi-adam") == 3e-3
  with pytest.raises(SystemExit, match="--settings 'nope': study transformers has full, "):
    study.settings_of("transformers", False, None, variant="nope")


def test_fashion_configs_follow_table1_variants():
  get = configs.get_config
  assert get("fashion/lenet5/sgd_naive").weight_decay == 0.0
  assert get("fashion/lenet5/adam").weight_decay == 0.0
  c = get("fashion/lenet5/splitlbi_mom_wd")
  assert (c.optimizer, c.learning_rate, c.momentum, c.weight_decay, c.kappa, c.nu, c.lam) == (
      "splitlbi", 0.1, 0.9, 1e-4, 1.0, 10.0, 1.0)
  assert c.dataset == "idx:/usr/share/datasets/fashion-mnist" and c.warmup_steps == 100
  assert get("fashion/conv4/adam").learning_rate == 1e-3
  assert get("fashion/conv4/sgd_nesterov").learning_rate == 0.01
  assert get("fashion/conv4/sgd_nesterov").nesterov


@pytest.mark.parametrize("name, expect", [
    ("table1", ["| splitlbi_mom_wd |", "| sgd_mom_wd |", "Compute: 4 runs"]),
    ("kappa_nu", ["| κ | ν | α |", "best W on supp Γ"]),
    ("path", ["Conv_1"]),
    ("sensitivity", ["Dead runs out of seeds", "largest stable lr", "larger ν"]),
    ("groups", ["| cross-leaf channel groups | 6 |", "pruned filters kept back",
                "(a) BatchNorm scale / shift", "| consumers | 4 |"]),
    ("growth", ["| grow/preserve |", "| grow/official |", "| fixed/full | 6 / 16 / 120 / 84 |"]),
    ("transformers", ["## GPT on fortunes", "## ViT on Fashion-MNIST", "| splitlbi-adam | 6 |",
                      "| dense-adamw | 6 | all |", "importance + fine-tune",
                      # the smoke ViT (d 16, head_dim 8, one block) at half width, by hand:
                      # outside the block 7·7·16 + 16 + 16 + 17·16 + 32 + 16·10 + 10 = 1290;
                      # the block of 2 heads, 32 neurons 2224, of 1 head, 16 neurons 1160
                      "| narrow-adamw | 6 | 1.0 ± 0.0 | 16 ± 0 | 69.7 ± 0.0 | – | – |"]),
])
def test_every_study_runs_in_smoke_mode(idx_dir, text_dir, tmp_path, name, expect):
  out = str(tmp_path / "out")
  written = study.main([name, "--smoke", "--data", f"idx:{idx_dir}", "--out", out,
                        "--text", text_dir])
  text = open(written[0]).read()
  assert text.startswith(f"# Study `{name}` (smoke)")
  for snippet in expect:
    assert snippet in text, snippet
  assert [f for f in os.listdir(os.path.join(out, name)) if f.endswith(".png")]
  if name == "transformers":  # the slim models rebuilt from the results are the runs' own
    for model in ("gpt", "vit"):
      with open(os.path.join(out, name, "runs", model, "latency", "result.json")) as f:
        quiet = json.load(f)
      assert sorted(quiet["slim"]) == ["splitlbi-adam/seed0/stop6", "splitlbi-sgd/seed0/stop6"]
      assert quiet["flops_rel_diff"] < 1e-6
