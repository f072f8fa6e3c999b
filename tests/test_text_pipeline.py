"""The byte-level text pipeline: fortune parsing, the documented split rule, batches."""

import numpy as np
import pytest

from examples import text_pipeline as tp


def _corpus(tmp_path, n=23):
  """Two fortune files of ``n`` fortunes in all, one with overstriking, plus ignored files."""
  a = [f"fortune {i}\nline two" for i in range(12)]
  b = [f"second file {i}" for i in range(12, n)]
  (tmp_path / "alpha").write_text("\n%\n".join(a) + "\n%\n")
  (tmp_path / "beta").write_text("_\bb_\bo_\bl_\bd\n%\n" + "\n%\n".join(b) + "\n")
  (tmp_path / "alpha.dat").write_bytes(b"\x00\x01")
  (tmp_path / "ascii-art").write_text("#####\n%\n")
  return a, ["bold"] + b


def test_fortunes_are_parsed_in_sorted_file_order(tmp_path):
  a, b = _corpus(tmp_path)
  assert tp.read_fortunes(str(tmp_path)) == a + b


def test_split_rule_every_tenth_fortune_is_validation(tmp_path):
  a, b = _corpus(tmp_path)
  fortunes = a + b
  s = tp.split(fortunes)
  want_valid = "\n\n".join(fortunes[i] for i in (9, 19))
  assert bytes(s.valid).decode() == want_valid
  assert bytes(s.train).decode().count("\n\n") == len(fortunes) - 2 - 1
  assert "fortune 9" not in bytes(s.train).decode()


def test_batches_are_next_byte_pairs(tmp_path):
  _corpus(tmp_path)
  s = tp.load(str(tmp_path))
  batch = next(tp.train_batches(s.train, 4, 8, seed=0))
  assert batch["inputs"].shape == batch["targets"].shape == (4, 8)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  again = next(tp.train_batches(s.train, 4, 8, seed=0))
  np.testing.assert_array_equal(batch["inputs"], again["inputs"])
  windows = list(tp.eval_batches(s.valid, 2, 5))
  flat = np.concatenate([w["inputs"] for w in windows]).reshape(-1)
  np.testing.assert_array_equal(flat, s.valid[:flat.size])
  assert sum(len(w["inputs"]) for w in windows) == (s.valid.size - 1) // 5


def test_missing_corpus_says_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
    tp.read_fortunes(str(tmp_path / "nope"))
