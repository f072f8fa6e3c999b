"""Input pipelines: sklearn digits (embedded), IDX files, tensorflow-datasets sources.

Three kinds of sources, one batching scheme:

- ``digits``: scikit-learn's 8×8 handwritten digits (1797 images, shipped with
  scikit-learn, no download), split 80/20 with a fixed seed.
- ``idx:/some/dir``: a directory of MNIST-format IDX files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``), for offline
  users who already have MNIST / Fashion-MNIST files (Debian:
  ``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``). Each directory is normalised with the
  per-channel mean and standard deviation of its own full training split
  (:func:`idx_stats`): MNIST files give MNIST's usual 0.1307 / 0.3081,
  Fashion-MNIST files 0.2860 / 0.3530.
- ``mnist``, ``fashion_mnist``, ``cifar10``, ``imagenet2012``: random-access
  ``tfds.data_source`` readers (array_record files prepared beforehand under
  ``data_dir``; no TensorFlow needed). Nothing is ever downloaded here: a missing
  dataset raises :class:`DatasetNotFoundError` at once with instructions.

Batches are NumPy dicts ``{"image": float32 (b, H, W, C), "label": int32 (b,)}``
(plus ``"mask"`` for evaluation, 0 on padding). The training order of epoch e is
a permutation drawn from ``(seed, e)`` and the augmentation of step s from
``(seed, e, s, process)``, so a resumed run sees the same batches as an
uninterrupted one. Each host (``jax.process_index()``) reads only its slice of
every global batch (multi-host data parallelism).

Augmentation follows the paper (He et al. 2016 / PyTorch defaults): CIFAR
random crop (zero-pad 4) + horizontal flip; ImageNet random-resized crop
(scale 0.08–1, ratio 3/4–4/3) + flip, evaluation resize to size/0.875 and
center crop.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagenet2012", "idx:<dir>")

# Per-channel normalisation constants (IDX directories: their own, see idx_stats).
# digits: none, its values 0..16 are only scaled to [0, 1].
_STATS = {
    "digits": ((0.0,), (1.0,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not available locally (nothing is downloaded by the examples)."""


# ----------------------------------------------------------------------------- sources


class ArraySource:
  """An in-memory split: uint8/float images (N, H, W, C) and int labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim == 3:
      images = images[..., None]
    if len(images) != len(labels):
      raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length.")
    self.images, self.labels = images, labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, idx: np.ndarray) -> tuple[Any, np.ndarray]:
    return self.images[idx], self.labels[idx]


class RecordSource:
  """A random-access source of ``{"image", "label"}`` records (``tfds.data_source``).

  Records are read (and JPEGs decoded) by a thread pool, in order.
  """

  def __init__(self, source: Sequence[dict], threads: int = 8):
    self.source = source
    self._pool = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else None

  def __len__(self) -> int:
    return len(self.source)

  def get(self, idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    keys = [int(i) for i in idx]
    read = self.source.__getitem__
    records = list(self._pool.map(read, keys)) if self._pool else [read(k) for k in keys]
    images = [np.asarray(r["image"]) for r in records]
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    return images, np.asarray([int(r["label"]) for r in records], np.int32)


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[ArraySource, ArraySource]:
  """scikit-learn's 8×8 digits (values 0..16), a fixed stratified 80/20 split."""
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split
  d = sk_load_digits()
  images = (d.images / 16.0).astype(np.float32)[..., None]
  xtr, xte, ytr, yte = train_test_split(images, d.target, test_size=test_fraction,
                                        random_state=seed, stratify=d.target)
  return ArraySource(xtr, ytr), ArraySource(xte, yte)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (raw or gzip): magic 0x0000 <dtype> <ndim>, big-endian dims."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4]!r}).")
  ndim = data[3]
  dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  count = int(np.prod(dims)) if dims else 1
  body = np.frombuffer(data, dtype, count=count, offset=4 + 4 * ndim)
  return body.reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> str:
  for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
    p = os.path.join(directory, name)
    if os.path.exists(p):
      return p
  raise DatasetNotFoundError(
      f"IDX dataset directory {directory!r} has no {stem}[.gz]. Expected the four MNIST "
      "files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
      "t10k-labels-idx1-ubyte (optionally .gz), e.g. from "
      "https://yann.lecun.com/exdb/mnist/ or Fashion-MNIST's GitHub page.")


def load_idx_dir(directory: str) -> tuple[ArraySource, ArraySource]:
  """Train and test splits from a directory of MNIST-format IDX files.

  The files are read once per process (cached by path and modification time).
  """
  if not os.path.isdir(directory):
    raise DatasetNotFoundError(f"IDX dataset directory {directory!r} does not exist.")
  return _load_idx_cached(os.path.abspath(directory), os.stat(directory).st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_idx_cached(directory: str, mtime_ns: int) -> tuple[ArraySource, ArraySource]:
  del mtime_ns  # part of the cache key only
  splits = []
  for prefix in ("train", "t10k"):
    images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
    splits.append(ArraySource(images, labels))
  return splits[0], splits[1]


def idx_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) standard deviation of images scaled to [0, 1].

  Args:
    images: (N, H, W) or (N, H, W, C) pixels; uint8 values are divided by 255
      (as the loader does), other dtypes are used as they are.

  Returns:
    ``(means, stds)``, one float per channel. uint8 images are summarised
    exactly (and cheaply) through a 256-bin histogram per channel.
  """
  x = images[..., None] if images.ndim == 3 else images
  means, stds = [], []
  for c in range(x.shape[-1]):
    channel = x[..., c]
    if channel.dtype == np.uint8:
      counts = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
      values = np.arange(256) / 255.0
      mean = float(counts @ values / counts.sum())
      var = float(counts @ (values - mean) ** 2 / counts.sum())
    else:
      flat = channel.astype(np.float64).ravel()
      mean, var = float(flat.mean()), float(flat.var())
    if not var > 0:
      raise ValueError(f"idx_stats: channel {c} of the training images is constant; "
                       "it cannot be normalised.")
    means.append(mean)
    stds.append(var ** 0.5)
  return tuple(means), tuple(stds)


@functools.lru_cache(maxsize=2)
def _cached_idx_stats(train: ArraySource) -> tuple[tuple[float, ...], tuple[float, ...]]:
  return idx_stats(train.images)


def load_tfds(name: str, split: str, data_dir: Optional[str]) -> RecordSource:
  """``tfds.data_source(name, split, download=False)``, failing fast when absent."""
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    len(source)
  except Exception as e:  # tfds raises several types (AssertionError, NotImplementedError, ...)
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise DatasetNotFoundError(
        f"Dataset {name!r} (split {split!r}) is not available under data_dir={where!r}; "
        "the examples never download. Prepare it once in array_record format, e.g.\n"
        f"  tfds build {name} --data_dir={where} --file_format=array_record\n"
        "(imagenet2012 needs the ILSVRC2012 tar files placed in <data_dir>/downloads/manual), "
        "or use --set dataset=digits (embedded) or dataset=idx:/dir/with/mnist/idx/files.\n"
        f"Underlying error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ) from e
  return RecordSource(source)


# ----------------------------------------------------------------------- preprocessing


def _normalize(x: np.ndarray, stats: tuple[Sequence[float], Sequence[float]]) -> np.ndarray:
  mean, std = stats
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def _to_float(images: Any) -> np.ndarray:
  x = np.asarray(images)
  return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def cifar_augment(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Random crop of the zero-padded image (pad ``pad``) and random horizontal flip."""
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  rows = dy[:, None] + np.arange(h)[None]
  cols = dx[:, None] + np.arange(w)[None]
  out = xp[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  from PIL import Image
  h, w = size
  if image.shape[:2] == (h, w):
    return image
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  out = np.asarray(pil.resize((w, h), Image.BILINEAR))
  return out[..., None] if out.ndim == 2 else out


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (torchvision RandomResizedCrop) + random flip, to size×size."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:  # central crop at the clamped aspect ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
      ch, cw = h, int(round(h * ratio[1]))
    else:
      cw, ch = w, h
    y, x = (h - ch) // 2, (w - cw) // 2
  out = _resize(image[y:y + ch, x:x + cw], (size, size))
  return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """Resize the shorter side to size/crop_fraction, then take the central size×size."""
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  nh, nw = (short, max(size, round(w * short / h))) if h <= w else (max(size, round(h * short / w)), short)
  image = _resize(image, (nh, nw))
  y, x = (nh - size) // 2, (nw - size) // 2
  return image[y:y + size, x:x + size]


# ----------------------------------------------------------------------------- loaders


@dataclasses.dataclass
class DataInfo:
  """What the model needs to know about a dataset."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int


class Loader:
  """Batches one split of a source: shuffled, augmented, sharded over processes.

  Args:
    source: an :class:`ArraySource` or :class:`RecordSource`.
    kind: normalisation / augmentation family (``digits``, ``mnist``, ``cifar10``, ...).
    image_size: output height = width (``None``: keep the source size; required
      for ImageNet).
    seed: base seed of shuffling and augmentation.
    train: shuffle + augment (else ordered, padded to full batches with a mask).
    augment: apply the dataset's augmentation when ``train``.
    stats: per-channel ``(means, stds)`` of the normalisation (default: the
      constants of ``kind``; required for ``kind="idx"``).
  """

  def __init__(self, source, kind: str, *, image_size: Optional[int] = None, seed: int = 0,
               train: bool = True, augment: bool = True, threads: int = 8,
               stats: Optional[tuple[Sequence[float], Sequence[float]]] = None):
    if stats is None and kind not in _STATS:
      raise ValueError(f"Loader: no normalisation constants for kind={kind!r}; pass stats.")
    self.stats = stats if stats is not None else _STATS[kind]
    self.source, self.kind, self.image_size = source, kind, image_size
    self.seed, self.train, self.augment = seed, train, augment
    self._pool = (concurrent.futures.ThreadPoolExecutor(threads)
                  if isinstance(source, RecordSource) else None)

  def __len__(self) -> int:
    return len(self.source)

  def steps_per_epoch(self, batch_size: int) -> int:
    return len(self.source) // batch_size

  def _process(self, images: Any, rng: np.random.Generator) -> np.ndarray:
    size, kind = self.image_size, self.kind
    aug = self.train and self.augment
    if kind == "imagenet2012":
      size = size or 224
      fn = ((lambda im, r: random_resized_crop(im, size, r)) if aug
            else (lambda im, r: center_crop(im, size)))
      rngs = [np.random.default_rng(s) for s in rng.integers(0, 2**63, len(images))]
      images = list(self._pool.map(fn, images, rngs)) if self._pool else list(map(fn, images, rngs))
      x = _to_float(np.stack(images))
    else:
      x = images if isinstance(images, np.ndarray) else np.stack(images)
      if size is not None and x.shape[1:3] != (size, size):
        x = np.stack([_resize(im, (size, size)) for im in np.asarray(x)])
      x = _to_float(x)
      if aug and kind == "cifar10":
        x = cifar_augment(x, rng)
    return _normalize(x, self.stats)

  def train_batches(self, batch_size: int, epoch: int, *, start_step: int = 0,
                    max_steps: Optional[int] = None, process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's slices of the global batches of ``epoch`` (drop remainder)."""
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes.")
    n = len(self.source)
    steps = n // batch_size if max_steps is None else min(max_steps, n // batch_size)
    if steps == 0:
      raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples.")
    order = np.random.default_rng([self.seed, epoch]).permutation(n)
    local = batch_size // process_count
    for step in range(start_step, steps):
      idx = order[step * batch_size + process_index * local:][:local]
      images, labels = self.source.get(idx)
      rng = np.random.default_rng([self.seed, epoch, step, process_index])
      yield {"image": self._process(images, rng), "label": labels}

  def eval_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1,
                   max_examples: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
    """All examples in order, the last batch zero-padded; ``mask`` is 1 on real ones."""
    n = len(self.source) if max_examples is None else min(max_examples, len(self.source))
    local = batch_size // process_count
    rng = np.random.default_rng(0)
    for start in range(0, n, batch_size):
      idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
      valid = idx < n
      images, labels = self.source.get(np.where(valid, idx, 0))
      x = self._process(images, rng)
      x[~valid] = 0
      yield {"image": x, "label": np.where(valid, labels, 0).astype(np.int32),
             "mask": valid.astype(np.float32)}


_TFDS_EVAL_SPLIT = {"imagenet2012": "validation"}


def create_datasets(dataset: str, *, data_dir: Optional[str] = None, image_size: Optional[int] = None,
                    seed: int = 0, augment: bool = True,
                    train_examples: Optional[int] = None) -> tuple[Loader, Loader, DataInfo]:
  """Train and eval :class:`Loader` plus :class:`DataInfo` for ``dataset``.

  Args:
    dataset: ``"digits"``, ``"idx:<dir>"`` (or ``"idx"`` with ``data_dir``),
      or a TFDS name among ``mnist``, ``fashion_mnist``, ``cifar10``,
      ``imagenet2012``.
    data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``) or the IDX directory.
    image_size: resize / crop images to this size (ImageNet default 224).
    seed: shuffling and augmentation seed.
    augment: standard augmentation for training (CIFAR / ImageNet).
    train_examples: keep only the first n training examples (quick runs).

  Raises:
    DatasetNotFoundError: at once when the data is not on disk.
  """
  stats = None  # the constants of the dataset's kind
  if dataset == "digits":
    train, test = load_digits(seed=0)
    kind, num_classes = "digits", 10
  elif dataset == "idx" or dataset.startswith("idx:"):
    directory = dataset[4:] if dataset.startswith("idx:") else data_dir
    if not directory:
      raise ValueError("dataset='idx' needs a directory: dataset='idx:/path' or data_dir.")
    train, test = load_idx_dir(os.path.expanduser(directory))
    kind, num_classes = "idx", int(max(train.labels.max(), test.labels.max())) + 1
    stats = _cached_idx_stats(train)  # the full training split, before train_examples
  elif dataset in ("mnist", "fashion_mnist", "cifar10", "imagenet2012"):
    train = load_tfds(dataset, "train", data_dir)
    test = load_tfds(dataset, _TFDS_EVAL_SPLIT.get(dataset, "test"), data_dir)
    kind = dataset
    num_classes = 1000 if dataset == "imagenet2012" else 10
  else:
    raise ValueError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
  if train_examples is not None:
    if isinstance(train, ArraySource):
      train = ArraySource(train.images[:train_examples], train.labels[:train_examples])
    else:
      train = RecordSource(_Head(train.source, train_examples))
  tr = Loader(train, kind, image_size=image_size, seed=seed, train=True, augment=augment,
              stats=stats)
  te = Loader(test, kind, image_size=image_size, seed=seed, train=False, stats=stats)
  probe = next(te.eval_batches(1))["image"]
  info = DataInfo(dataset if kind != "idx" else "idx", num_classes, tuple(probe.shape[1:]),
                  len(train), len(test))
  return tr, te, info


class _Head:
  """The first n records of a random-access source."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]
