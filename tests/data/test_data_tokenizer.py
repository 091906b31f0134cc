"""Tokenizers: byte-level ids and round trips, the `tokenizers` wrapper, load_tokenizer specs.

All checks are exact (token ids and strings): no tolerance applies.
"""

import json
import sys

import pytest

from m1jax.data import tokenizer as tokenizer_lib


def test_byte_tokenizer_ids_and_vocab():
  tok = tokenizer_lib.ByteTokenizer()
  specials = {tok.pad_id, tok.bos_id, tok.eos_id}
  assert len(specials) == 3 and min(specials) >= 256
  assert tok.vocab_size % 8 == 0 and tok.vocab_size > max(specials)
  assert tok.encode("Az 0") == [65, 122, 32, 48]


@pytest.mark.parametrize(
    "text", ["", "12+34=", "make 26 from 3 5 7:", "naïve café ∑ 🙂", "a\nb\tc"])
def test_byte_tokenizer_round_trip(text):
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(text)
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text


def test_byte_tokenizer_decode_skips_specials_and_replaces_bad_utf8():
  tok = tokenizer_lib.ByteTokenizer()
  ids = [tok.bos_id] + tok.encode("ab") + [tok.eos_id, tok.pad_id, tok.vocab_size - 1]
  assert tok.decode(ids) == "ab"
  assert tok.decode([0xFF, 97]) == "\ufffda"
  assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # truncated multi-byte character


def test_byte_tokenizer_rejects_out_of_range_ids():
  tok = tokenizer_lib.ByteTokenizer()
  for bad in (-1, tok.vocab_size):
    with pytest.raises(ValueError, match="outside"):
      tok.decode([bad])


def _write_hf_tokenizer(directory, with_config=True):
  """A small word-level tokenizer.json (and tokenizer_config.json) written with `tokenizers`."""
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "hello": 4, "world": 5, "42": 6}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.add_special_tokens(["<pad>", "<s>", "</s>"])
  path = directory / "tokenizer.json"
  tok.save(str(path))
  if with_config:
    config = {"eos_token": {"content": "</s>"}, "pad_token": "<pad>", "bos_token": "<s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return path


def test_hf_tokenizer_round_trip_and_special_ids(tmp_path):
  path = _write_hf_tokenizer(tmp_path)
  tok = tokenizer_lib.HFTokenizer(str(path), eos_token="</s>", pad_token="<pad>", bos_token="<s>")
  assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (2, 0, 1, 7)
  ids = tok.encode("hello world 42")
  assert ids == [4, 5, 6]  # no special tokens are added by encode
  assert tok.decode([1] + ids + [2, 0]) == "hello world 42"


def test_hf_tokenizer_defaults_and_explicit_ids(tmp_path):
  path = str(_write_hf_tokenizer(tmp_path))
  tok = tokenizer_lib.HFTokenizer(path, eos_id=2)
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 2, None)  # pad falls back to EOS
  with pytest.raises(ValueError, match="eos_token"):
    tokenizer_lib.HFTokenizer(path, eos_token="<eos>")
  with pytest.raises(ValueError, match="EOS token is required"):
    tokenizer_lib.HFTokenizer(path)
  with pytest.raises(ValueError, match="pad_id"):
    tokenizer_lib.HFTokenizer(path, eos_id=2, pad_id=99)
  with pytest.raises(ValueError, match="give one of them"):
    tokenizer_lib.HFTokenizer(path, eos_id=2, eos_token="</s>")


def test_load_tokenizer_specs(tmp_path):
  assert isinstance(tokenizer_lib.load_tokenizer("byte"), tokenizer_lib.ByteTokenizer)
  path = _write_hf_tokenizer(tmp_path)
  from_dir = tokenizer_lib.load_tokenizer(str(tmp_path))  # names from tokenizer_config.json
  assert (from_dir.eos_id, from_dir.pad_id, from_dir.bos_id) == (2, 0, 1)
  overridden = tokenizer_lib.load_tokenizer(str(tmp_path), eos_id=0)
  assert overridden.eos_id == 0
  from_file = tokenizer_lib.load_tokenizer(str(path), eos_token="</s>")
  assert from_file.encode("world") == [5]
  with pytest.raises(ValueError, match="spec"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing.json"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="no tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(empty))


def test_hf_tokenizer_without_package_says_how_to_install(tmp_path, monkeypatch):
  path = _write_hf_tokenizer(tmp_path)
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match="m1jax\\[tokenizers\\]"):
    tokenizer_lib.HFTokenizer(str(path), eos_token="</s>")
