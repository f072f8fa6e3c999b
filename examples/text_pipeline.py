"""Byte-level text data for the GPT: real English text from a Debian package.

The corpus is the ``fortunes`` package (``apt-get install fortunes`` puts plain-text
files in ``/usr/share/games/fortunes``: quotations, jokes, poems, definitions,
computer lore; ~2.5 MB of English). Files are read in sorted order, fortunes are
split at lines holding a single ``%``; backspace overstriking is removed and ASCII
art (``ascii-art``, ``art``) is left out.

Split rule (documented and fixed): the fortunes are numbered in that order and
fortune ``i`` is validation text when ``i % 10 == 9``, training text otherwise
(10 % validation, spread over every file). Each split is the fortunes joined by
``"\\n\\n"``, encoded as bytes (vocabulary 256).

Training batches are windows of ``context + 1`` bytes at random offsets (a NumPy
generator seeded per run); evaluation reads the validation text in consecutive
non-overlapping windows. Inputs are the first ``context`` bytes, targets the
last ``context`` (the next byte at every position).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from typing import Optional

import numpy as np

FORTUNES_DIR = "/usr/share/games/fortunes"
EXCLUDED = ("ascii-art", "art")
VOCAB = 256
VALID_EVERY = 10


def read_fortunes(directory: str = FORTUNES_DIR) -> list[str]:
  """Every fortune of the text files of ``directory`` (sorted file order).

  Raises:
    FileNotFoundError: no such directory, or no fortune files in it (the error
      says to install the ``fortunes`` package).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"text corpus: no directory {directory!r}; install it with "
                            "`apt-get install fortunes` or pass another directory.")
  names = sorted(n for n in os.listdir(directory)
                 if "." not in n and n not in EXCLUDED
                 and os.path.isfile(os.path.join(directory, n)))
  out = []
  for name in names:
    with open(os.path.join(directory, name), encoding="latin-1") as f:
      text = re.sub(".\b", "", f.read())  # overstriking: "_\bx" prints x
    out.extend(p.strip("\n") for p in re.split(r"^%$", text, flags=re.M) if p.strip())
  if not out:
    raise FileNotFoundError(f"text corpus: no fortunes in {directory!r}.")
  return out


@dataclasses.dataclass(frozen=True)
class TextSplits:
  """The encoded training and validation bytes (uint8 arrays)."""

  train: np.ndarray
  valid: np.ndarray

  @property
  def vocab(self) -> int:
    return VOCAB


def split(fortunes: list[str]) -> TextSplits:
  """Fortune ``i`` goes to validation when ``i % 10 == 9``; each split joined by blank lines."""
  def encode(parts):
    return np.frombuffer("\n\n".join(parts).encode("latin-1"), np.uint8).copy()
  train = [f for i, f in enumerate(fortunes) if i % VALID_EVERY != VALID_EVERY - 1]
  valid = [f for i, f in enumerate(fortunes) if i % VALID_EVERY == VALID_EVERY - 1]
  return TextSplits(encode(train), encode(valid))


def load(directory: str = FORTUNES_DIR, max_bytes: Optional[int] = None) -> TextSplits:
  """The corpus of ``directory``, split; ``max_bytes`` keeps the first bytes of each split."""
  s = split(read_fortunes(directory))
  if max_bytes:
    s = TextSplits(s.train[:max_bytes], s.valid[:max_bytes // VALID_EVERY or 1])
  return s


def train_batches(data: np.ndarray, batch: int, context: int,
                  seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches ``{"inputs", "targets"}`` (int32, ``(batch, context)``) of random windows."""
  if data.size <= context + 1:
    raise ValueError(f"text: {data.size} bytes are too few for context {context}.")
  rng = np.random.default_rng(seed)
  offsets = np.arange(context + 1)
  while True:
    starts = rng.integers(0, data.size - context - 1, size=batch)
    windows = data[starts[:, None] + offsets].astype(np.int32)
    yield {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def eval_batches(data: np.ndarray, batch: int, context: int,
                 max_windows: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """Consecutive non-overlapping windows of ``data`` (the last partial batch included)."""
  n = (data.size - 1) // context
  n = min(n, max_windows) if max_windows else n
  for first in range(0, n, batch):
    idx = np.arange(first, min(first + batch, n))
    windows = data[idx[:, None] * context + np.arange(context + 1)].astype(np.int32)
    yield {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
