"""Deterministic, checkpointable grain pipelines for RL prompts and SFT demonstrations.

Sources are `grain.MapDataset[Example]`:
  synthetic_source(task, seed=0)              examples addressed by index (infinite by default)
  jsonl_source("data.jsonl", split="train")   user data
Batches come from `grain.IterDataset`s; their iterators save and restore their position exactly:

  it = iter(prompt_dataset(synthetic_source(task, seed=0), tok, batch_size=8,
                           max_prompt_len=32, seed=0))
  batch = next(it)          # PromptBatch: tokens [B, P] left-padded, mask, lengths, examples
  state = it.get_state()    # a small JSON-serialisable dict: save it with the checkpoint
  it.set_state(state)       # on a fresh iterator of the same dataset: resumes exactly

Held-out evaluation: the train and eval splits never share a prompt (see `tasks.prompt_split`);
`eval_prompt_batches(tasks.make_eval_set(task, size=256, seed=0), ...)` gives fixed-shape
batches covering every eval example once.
Multi-host: give each process its `shard_index` / `shard_count` (jax.process_index() /
jax.process_count()) and its per-process batch size.
"""

from typing import NamedTuple, Sequence

import grain
import numpy as np

from m1jax.data import tasks
from m1jax.data.tokenizer import Tokenizer

# A single reader thread: elements are cheap to build, and CPU hosts are small.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
# Length of the "infinite" synthetic stream: never exhausted in practice, and small enough that
# grain can still index repeats of it.
STREAM_LENGTH = 2**40


class PromptBatch(NamedTuple):
  """Prompts for RL generation, left-padded so that every prompt ends at column P - 1.

  SFT sequences start at position 0 with no padding in front, so to see prompts the same way the
  sampler should keep pad columns (mask False) out of attention and out of the lightning
  recurrent state, and number positions from the first real token: positions = cumsum(mask) - 1.
  """
  tokens: np.ndarray  # int32 [B, P]: pad ... pad BOS prompt
  mask: np.ndarray  # bool [B, P]: True on prompt tokens (BOS included)
  lengths: np.ndarray  # int32 [B]: number of prompt tokens
  valid: np.ndarray  # bool [B]: False on rows that only pad the last eval batch
  examples: tuple[tasks.Example, ...]  # the B examples, for rewards


class SFTBatch(NamedTuple):
  """Prompt + demonstration sequences, right-padded.

  loss_mask[b, t] = 1 when tokens[b, t] is a demonstration token (EOS included), i.e. a target
  predicted from position t - 1: use it with logits[:, :-1] against tokens[:, 1:] as
  loss_mask[:, 1:].
  """
  tokens: np.ndarray  # int32 [B, T]: BOS prompt demonstration EOS pad ... pad
  loss_mask: np.ndarray  # float32 [B, T]


def synthetic_source(
    task: tasks.Task,
    *,
    seed: int,
    split: str = "train",
    eval_fraction: float = tasks.DEFAULT_EVAL_FRACTION,
    size: int | None = None,
) -> grain.MapDataset:
  """Element i is `tasks.generate_example(task, seed=seed, index=i, split=split)`.

  `size=None` gives an effectively infinite stream (STREAM_LENGTH) of fresh examples; an int
  gives a fixed pool of `size` examples that the batch pipelines shuffle and repeat.
  """
  length = STREAM_LENGTH if size is None else size
  if length < 1:
    raise ValueError(f"size: expected a positive number of examples, got {size}")
  return grain.MapDataset.range(length).map(
      lambda i: tasks.generate_example(task, seed=seed, index=int(i), split=split,
                                       eval_fraction=eval_fraction))


def jsonl_source(
    path: str,
    *,
    split: str | None = None,
    eval_fraction: float = tasks.DEFAULT_EVAL_FRACTION,
    **read_kwargs,
) -> grain.MapDataset:
  """Examples of a JSONL file (`tasks.read_jsonl` keywords); `split` keeps one hash split."""
  return examples_source(tasks.read_jsonl(path, **read_kwargs), split=split,
                         eval_fraction=eval_fraction, where=path)


def examples_source(
    examples: Sequence[tasks.Example],
    *,
    split: str | None = None,
    eval_fraction: float = tasks.DEFAULT_EVAL_FRACTION,
    where: str = "examples",
) -> grain.MapDataset:
  """A list of examples (e.g. read from `where`); `split` keeps one hash split."""
  examples = list(examples)
  if split is not None:
    examples = tasks.split_examples(examples, split, eval_fraction)
    if not examples:
      raise ValueError(f"split: no {split!r} examples in {where} with "
                       f"eval_fraction={eval_fraction}")
  return grain.MapDataset.source(examples)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
  """BOS (when the tokenizer has one) followed by the prompt's tokens."""
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return bos + tokenizer.encode(prompt)


def encode_sft(tokenizer: Tokenizer, example: tasks.Example) -> tuple[list[int], list[int]]:
  """(tokens, loss_mask) of BOS + prompt + demonstration + EOS; the mask covers demo + EOS.

  Prompt and demonstration are encoded separately, so the prompt's tokens are exactly those
  RL generation starts from.
  """
  prompt = encode_prompt(tokenizer, example.prompt)
  target = tokenizer.encode(example.demonstration) + [tokenizer.eos_id]
  return prompt + target, [0] * len(prompt) + [1] * len(target)


def _left_pad(rows: Sequence[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, ...]:
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for b, ids in enumerate(rows):
    tokens[b, width - len(ids):] = ids
    mask[b, width - len(ids):] = True
  return tokens, mask, np.asarray([len(ids) for ids in rows], np.int32)


def _too_long(what: str, length: int, limit_name: str, limit: int, prompt: str) -> ValueError:
  return ValueError(f"{limit_name}: {what} of {length} tokens exceeds {limit_name}={limit} "
                    f"(prompt {prompt[:60]!r}); raise it or pass drop_long=True")


def _batched(
    source: grain.MapDataset,
    encode,
    length_limit: int,
    limit_name: str,
    batch_fn,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    drop_long: bool,
    shard_index: int,
    shard_count: int,
    read_options: grain.ReadOptions | None,
) -> grain.IterDataset:
  """source -> shard -> shuffle -> repeat -> encode -> length check -> batch.

  `encode(example)` returns a tuple whose first item is the token list checked against
  `length_limit`; `batch_fn` receives a list of (example, encode(example)).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index: expected 0 <= shard_index < shard_count={shard_count}, "
                     f"got {shard_index}")
  ds = source[shard_index::shard_count] if shard_count > 1 else source
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs: expected None or >= 1, got {num_epochs}")
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)

  def encode_checked(example):
    encoded = encode(example)
    if len(encoded[0]) <= length_limit:
      return example, encoded
    if drop_long:
      return None
    raise _too_long("sequence", len(encoded[0]), limit_name, length_limit, example.prompt)

  ds = ds.map(encode_checked)
  if drop_long:
    ds = ds.filter(lambda item: item is not None)
  return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS).batch(
      batch_size, drop_remainder=True, batch_fn=batch_fn)


def prompt_dataset(
    source: grain.MapDataset,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_prompt_len: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_long: bool = False,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """RL prompt batches: `PromptBatch` with tokens int32 [batch_size, max_prompt_len].

  Args:
    source: `MapDataset` of `tasks.Example`.
    tokenizer: used for `encode_prompt` and padding (`pad_id`).
    batch_size: prompts per batch (per process); incomplete final batches are dropped.
    max_prompt_len: P; prompts are left-padded to it.
    seed: shuffle seed (each epoch is reshuffled).
    shuffle: whether to shuffle the source.
    num_epochs: passes over a finite source; None repeats forever.
    drop_long: skip prompts longer than P instead of raising ValueError.
    shard_index: this process's shard of the source.
    shard_count: number of shards (processes).
    read_options: grain reader threads and prefetch; DEFAULT_READ_OPTIONS when None.
  """
  def batch_fn(items) -> PromptBatch:
    prompts = [ids for _, (ids,) in items]
    tokens, mask, lengths = _left_pad(prompts, max_prompt_len, tokenizer.pad_id)
    examples = tuple(example for example, _ in items)
    return PromptBatch(tokens, mask, lengths, np.ones(len(items), bool), examples)

  return _batched(
      source, lambda e: (encode_prompt(tokenizer, e.prompt),), max_prompt_len,
      "max_prompt_len", batch_fn,
      batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      drop_long=drop_long, shard_index=shard_index, shard_count=shard_count,
      read_options=read_options)


def sft_dataset(
    source: grain.MapDataset,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_len: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_long: bool = False,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """SFT batches: `SFTBatch` with tokens int32 and loss_mask float32 [batch_size, max_len].

  Arguments as in `prompt_dataset`; `max_len` bounds BOS + prompt + demonstration + EOS.
  """
  def batch_fn(items) -> SFTBatch:
    tokens = np.full((len(items), max_len), tokenizer.pad_id, np.int32)
    loss_mask = np.zeros((len(items), max_len), np.float32)
    for b, (_, (ids, mask)) in enumerate(items):
      tokens[b, :len(ids)] = ids
      loss_mask[b, :len(mask)] = mask
    return SFTBatch(tokens, loss_mask)

  return _batched(
      source, lambda e: encode_sft(tokenizer, e), max_len, "max_len", batch_fn,
      batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
      drop_long=drop_long, shard_index=shard_index, shard_count=shard_count,
      read_options=read_options)


def eval_prompt_batches(
    examples: Sequence[tasks.Example],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_prompt_len: int,
) -> list[PromptBatch]:
  """Every example exactly once, in order, as fixed-shape `PromptBatch`es.

  The last batch is filled up by repeating its last example with `valid` False, so that all
  batches have shape [batch_size, max_prompt_len] (one compilation); average metrics over
  `valid` rows only. Prompts longer than max_prompt_len raise ValueError.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
  if not examples:
    raise ValueError("examples: expected at least one example")
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    valid = np.arange(batch_size) < len(chunk)
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    encoded = [encode_prompt(tokenizer, e.prompt) for e in chunk]
    for e, ids in zip(chunk, encoded):
      if len(ids) > max_prompt_len:
        raise _too_long("prompt", len(ids), "max_prompt_len", max_prompt_len, e.prompt)
    tokens, mask, lengths = _left_pad(encoded, max_prompt_len, tokenizer.pad_id)
    batches.append(PromptBatch(tokens, mask, lengths, valid, tuple(chunk)))
  return batches
