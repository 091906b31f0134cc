"""Tokenizers with one small interface: a built-in byte tokenizer and a `tokenizers` wrapper.

Both satisfy `Tokenizer`: `encode(text) -> list[int]` never adds special tokens (pipelines add
BOS/EOS explicitly), and `decode(ids) -> str` drops special tokens.

Byte tokenizer ids:
  0..255   the UTF-8 bytes of the text
  256      PAD
  257      BOS
  258      EOS
  259..263 reserved (never produced by `encode`, dropped by `decode`)
`vocab_size` is 264: the 259 used ids rounded up to a multiple of 8, so that embedding and
LM-head shapes stay friendly to matrix units.
"""

import json
import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  """What pipelines, samplers and rewards need from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    ...

  @property
  def pad_id(self) -> int:
    ...

  @property
  def bos_id(self) -> int | None:
    ...

  @property
  def eos_id(self) -> int:
    ...

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes plus PAD/BOS/EOS; see the module docstring for the id layout."""

  NUM_BYTES = 256
  PAD_ID = 256
  BOS_ID = 257
  EOS_ID = 258
  VOCAB_SIZE = 264

  @property
  def vocab_size(self) -> int:
    return self.VOCAB_SIZE

  @property
  def pad_id(self) -> int:
    return self.PAD_ID

  @property
  def bos_id(self) -> int:
    return self.BOS_ID

  @property
  def eos_id(self) -> int:
    return self.EOS_ID

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes to text; special and reserved ids are skipped, invalid UTF-8 becomes U+FFFD."""
    data = bytearray()
    for i in ids:
      i = int(i)
      if not 0 <= i < self.VOCAB_SIZE:
        raise ValueError(f"ids: token id {i} is outside [0, {self.VOCAB_SIZE})")
      if i < self.NUM_BYTES:
        data.append(i)
    return data.decode("utf-8", errors="replace")


def _import_tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "HFTokenizer needs the optional `tokenizers` package: pip install 'm1jax[tokenizers]'"
    ) from e
  return tokenizers


class HFTokenizer:
  """A `tokenizers` tokenizer.json behind the `Tokenizer` interface.

  Special ids are given explicitly (`eos_id=...`) or looked up by token name (`eos_token=...`).
  EOS is required; PAD defaults to EOS when neither `pad_id` nor `pad_token` is given (the
  usual choice for decoder-only models; padded positions are masked anyway); BOS is optional
  (`bos_id` is None when not given, and pipelines then start prompts without it).
  """

  def __init__(
      self,
      path: str,
      *,
      eos_token: str | None = None,
      pad_token: str | None = None,
      bos_token: str | None = None,
      eos_id: int | None = None,
      pad_id: int | None = None,
      bos_id: int | None = None,
  ):
    tokenizers = _import_tokenizers()
    if not os.path.isfile(path):
      raise ValueError(f"path: no tokenizer file at {path!r}")
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eos = self._resolve("eos", eos_id, eos_token)
    if eos is None:
      raise ValueError("eos_token/eos_id: an EOS token is required, give its name or id")
    self._eos_id = eos
    pad = self._resolve("pad", pad_id, pad_token)
    self._pad_id = eos if pad is None else pad
    self._bos_id = self._resolve("bos", bos_id, bos_token)

  def _resolve(self, kind: str, token_id: int | None, token: str | None) -> int | None:
    if token_id is not None and token is not None:
      raise ValueError(f"{kind}_id/{kind}_token: give one of them, got {token_id!r} and {token!r}")
    if token is not None:
      token_id = self._tok.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{kind}_token: {token!r} is not in the tokenizer's vocabulary")
    if token_id is not None and not 0 <= token_id < self._vocab_size:
      raise ValueError(f"{kind}_id: {token_id} is outside [0, {self._vocab_size})")
    return token_id

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _special_token_names(config_path: str) -> dict[str, str]:
  """{"eos_token": ..., ...} from a transformers tokenizer_config.json (entries may be dicts)."""
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  names = {}
  for key in ("eos_token", "pad_token", "bos_token"):
    value = config.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str):
      names[key] = value
  return names


def load_tokenizer(spec: str, **kwargs) -> ByteTokenizer | HFTokenizer:
  """Builds a tokenizer from a spec string.

  Args:
    spec: "byte" for `ByteTokenizer`; a path to a tokenizer.json; or a directory holding
      tokenizer.json (its tokenizer_config.json, when present, supplies the default
      eos/pad/bos token names).
    **kwargs: `HFTokenizer` keyword arguments (eos_token, eos_id, ...); override the defaults.

  Returns:
    A tokenizer satisfying `Tokenizer`.
  """
  if spec == "byte":
    if kwargs:
      raise ValueError(f"kwargs: the byte tokenizer takes no options, got {sorted(kwargs)}")
    return ByteTokenizer()
  if os.path.isdir(spec):
    path = os.path.join(spec, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"spec: directory {spec!r} has no tokenizer.json")
    config_path = os.path.join(spec, "tokenizer_config.json")
    names = _special_token_names(config_path) if os.path.isfile(config_path) else {}
    for kind in ("eos", "pad", "bos"):
      if f"{kind}_id" in kwargs:
        names.pop(f"{kind}_token", None)
    return HFTokenizer(path, **{**names, **kwargs})
  if os.path.isfile(spec):
    return HFTokenizer(spec, **kwargs)
  raise ValueError(f"spec: expected 'byte', a tokenizer.json or a directory, got {spec!r}")
