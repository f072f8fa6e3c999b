"""Input pipelines of examples/input_pipeline.py: digits, IDX files, TFDS sources
(through tensorflow_datasets.testing.mock_data, no download), augmentation."""

import gzip
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from examples import input_pipeline as ip


def test_digits_split_and_batches():
  train, test, info = ip.create_datasets("digits")
  assert (info.num_train, info.num_eval, info.num_classes) == (1437, 360, 10)
  assert info.image_shape == (8, 8, 1)
  b = next(train.train_batches(64, epoch=1))
  assert b["image"].shape == (64, 8, 8, 1) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0  # sklearn values 0..16 / 16


def test_train_order_is_a_function_of_seed_and_epoch():
  train, _, _ = ip.create_datasets("digits")
  labels = lambda epoch: np.concatenate(  # noqa: E731
      [b["label"] for b in train.train_batches(100, epoch)])
  np.testing.assert_array_equal(labels(3), labels(3))
  assert not np.array_equal(labels(3), labels(4))
  # start_step skips exactly the first batches (used when resuming mid-epoch).
  full = list(train.train_batches(100, 2))
  rest = list(train.train_batches(100, 2, start_step=3))
  np.testing.assert_array_equal(full[3]["image"], rest[0]["image"])


def test_each_process_gets_its_slice_of_the_global_batch():
  train, _, _ = ip.create_datasets("digits")
  whole = next(train.train_batches(64, 5))
  parts = [next(train.train_batches(64, 5, process_index=i, process_count=4)) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])


def test_eval_batches_cover_every_example_once_with_padding_mask():
  _, test, _ = ip.create_datasets("digits")
  batches = list(test.eval_batches(64))
  assert len(batches) == 6  # ceil(360 / 64)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and mask[:360].all() and not mask[360:].any()
  labels = np.concatenate([b["label"] for b in batches])[:360]
  np.testing.assert_array_equal(labels, test.source.labels)


def _write_idx(path, array, gz):
  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
      ">" + "I" * array.ndim, *array.shape)
  data = header + array.tobytes()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory(tmp_path, gz):
  rng = np.random.default_rng(0)
  tr_x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
  tr_y = rng.integers(0, 10, 30).astype(np.uint8)
  te_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  te_y = (np.arange(12) % 10).astype(np.uint8)
  sfx = ".gz" if gz else ""
  _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", tr_x, gz)
  _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", tr_y, gz)
  _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", te_x, gz)
  _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", te_y, gz)
  np.testing.assert_array_equal(ip.read_idx(str(tmp_path / f"train-images-idx3-ubyte{sfx}")), tr_x)
  train, test, info = ip.create_datasets(f"idx:{tmp_path}")
  assert (info.num_train, info.num_eval, info.num_classes) == (30, 12, 10)
  assert info.image_shape == (28, 28, 1)
  b = next(test.eval_batches(12))
  np.testing.assert_array_equal(b["label"], te_y)
  # Normalised with the directory's own training split: (x/255 - mean) / std.
  mean, std = (tr_x / 255.0).mean(), (tr_x / 255.0).std()
  np.testing.assert_allclose(b["image"][..., 0], (te_x / 255.0 - mean) / std, rtol=1e-5,
                             atol=1e-5)


def test_idx_stats_against_hand_values():
  # Two pixels 0 and 255 → values 0 and 1: mean 1/2, population std 1/2.
  images = np.array([[[0, 255]]], np.uint8)
  mean, std = ip.idx_stats(images)
  assert mean == pytest.approx((0.5,)) and std == pytest.approx((0.5,))
  # Per channel, and float images used as they are: channel 1 is 2, 4 → mean 3, std 1.
  rgb = np.array([[[[0.0, 2.0], [1.0, 4.0]]]], np.float32)  # (1, 1, 2, 2)
  mean, std = ip.idx_stats(rgb)
  assert mean == pytest.approx((0.5, 3.0)) and std == pytest.approx((0.5, 1.0))
  with pytest.raises(ValueError, match="channel 0 .* constant"):
    ip.idx_stats(np.zeros((2, 3, 3), np.uint8))


def test_idx_bad_magic_and_missing_files(tmp_path):
  (tmp_path / "x").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x05")
  with pytest.raises(ValueError, match="not an IDX file"):
    ip.read_idx(str(tmp_path / "x"))
  with pytest.raises(ip.DatasetNotFoundError, match="train-images-idx3-ubyte"):
    ip.create_datasets(f"idx:{tmp_path}")
  with pytest.raises(ip.DatasetNotFoundError, match="does not exist"):
    ip.create_datasets(f"idx:{tmp_path}/nowhere")


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagenet2012"])
def test_missing_tfds_dataset_fails_fast_with_instructions(tmp_path, name):
  with pytest.raises(ip.DatasetNotFoundError) as e:
    ip.create_datasets(name, data_dir=str(tmp_path))
  msg = str(e.value)
  assert repr(name) in msg and "tfds build" in msg and str(tmp_path) in msg
  assert "never download" in msg


def test_unknown_dataset():
  with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
    ip.create_datasets("svhn")


def test_cifar_augment_is_a_padded_crop_or_its_mirror():
  rng = np.random.default_rng(0)
  x = rng.random((6, 32, 32, 3)).astype(np.float32) + 1.0  # no zeros inside the image
  out = ip.cifar_augment(x, np.random.default_rng(1))
  assert out.shape == x.shape
  for img, aug in zip(x, out):
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    crops = [padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    assert any(np.array_equal(aug, c) or np.array_equal(aug, c[:, ::-1]) for c in crops)


def test_center_crop_and_random_resized_crop():
  img = np.arange(37 * 37 * 3, dtype=np.uint8).reshape(37, 37, 3)
  # shorter side already round(32 / 0.875) = 37: no resize, the central 32x32.
  np.testing.assert_array_equal(ip.center_crop(img, 32), img[2:34, 2:34])
  big = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
  assert ip.center_crop(big, 24).shape == (24, 24, 3)
  for s in range(5):
    assert ip.random_resized_crop(big, 16, np.random.default_rng(s)).shape == (16, 16, 3)


def test_cifar10_and_imagenet_through_mock_data_source():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    train, test, info = ip.create_datasets("cifar10")
    assert (info.num_classes, info.image_shape, info.num_train) == (10, (32, 32, 3), 12)
    b = next(train.train_batches(8, 1))
    assert b["image"].shape == (8, 32, 32, 3) and b["label"].shape == (8,)
    # CIFAR normalisation keeps values in [(0 - μ)/σ, (1 - μ)/σ]
    assert b["image"].min() >= -0.4914 / 0.2470 - 1e-4
    train, test, info = ip.create_datasets("imagenet2012", image_size=24)
    assert (info.num_classes, info.image_shape) == (1000, (24, 24, 3))
    assert next(train.train_batches(4, 1))["image"].shape == (4, 24, 24, 3)
    ev = list(test.eval_batches(8))
    assert sum(e["mask"].sum() for e in ev) == 12
