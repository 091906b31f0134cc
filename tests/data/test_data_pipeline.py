"""grain pipelines: batch layout, determinism, exact resume from saved state, held-out split.

Token batches are integer arrays compared exactly; no tolerance applies.
"""

import itertools
import json

import numpy as np
import pytest

from m1jax.data import pipeline
from m1jax.data import tasks
from m1jax.data import tokenizer as tokenizer_lib

TOK = tokenizer_lib.ByteTokenizer()
TASK = tasks.ArithmeticTask()


def _prompts(tok=TOK, **kwargs):
  kwargs = {"batch_size": 4, "max_prompt_len": 12, "seed": 0, **kwargs}
  source = kwargs.pop("source", None) or pipeline.synthetic_source(TASK, seed=0)
  return pipeline.prompt_dataset(source, tok, **kwargs)


def _sft(**kwargs):
  kwargs = {"batch_size": 4, "max_len": 40, "seed": 0, **kwargs}
  source = kwargs.pop("source", None) or pipeline.synthetic_source(TASK, seed=0)
  return pipeline.sft_dataset(source, TOK, **kwargs)


def _assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    if isinstance(x, np.ndarray):
      np.testing.assert_array_equal(x, y)
    else:
      assert x == y


def test_prompt_batch_is_left_padded():
  batch = next(iter(_prompts()))
  assert batch.tokens.shape == (4, 12) and batch.tokens.dtype == np.int32
  assert batch.mask.dtype == bool and batch.lengths.dtype == np.int32 and batch.valid.all()
  for b, example in enumerate(batch.examples):
    length = len(example.prompt) + 1
    assert batch.lengths[b] == length
    np.testing.assert_array_equal(batch.mask[b], np.arange(12) >= 12 - length)
    assert (batch.tokens[b, :12 - length] == TOK.pad_id).all()
    assert batch.tokens[b, 12 - length] == TOK.bos_id
    assert TOK.decode(batch.tokens[b]) == example.prompt


def test_sft_batch_masks_only_the_demonstration():
  source = pipeline.synthetic_source(TASK, seed=0)
  batch = next(iter(_sft(source=source, shuffle=False)))
  assert batch.tokens.shape == batch.loss_mask.shape == (4, 40)
  assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == np.float32
  for b in range(4):
    example = source[b]
    target = batch.tokens[b][batch.loss_mask[b] == 1]
    assert target[-1] == TOK.eos_id
    assert TOK.decode(target) == example.demonstration
    prompt_part = batch.tokens[b][:1 + len(example.prompt)]
    assert prompt_part[0] == TOK.bos_id and TOK.decode(prompt_part) == example.prompt
    assert (batch.loss_mask[b, :len(prompt_part)] == 0).all()
    assert (batch.tokens[b, len(prompt_part) + len(target):] == TOK.pad_id).all()


def test_same_seed_same_batches_other_seed_other_batches():
  source = pipeline.synthetic_source(TASK, seed=0, size=64)
  runs = [list(_prompts(source=source, seed=s, num_epochs=1)) for s in (5, 5, 6)]
  for a, b in zip(runs[0], runs[1], strict=True):
    _assert_batches_equal(a, b)
  assert [b.examples for b in runs[0]] != [b.examples for b in runs[2]]
  # One epoch of a 64-example pool is a permutation of it.
  seen = sorted(e.prompt for batch in runs[2] for e in batch.examples)
  assert seen == sorted(source[i].prompt for i in range(64))


@pytest.mark.parametrize("make, kwargs", [
    (_prompts, {"source": pipeline.synthetic_source(TASK, seed=1, size=10)}),  # crosses epochs
    (_prompts, {"drop_long": True, "max_prompt_len": 6}),  # filtered elements
    (_sft, {}),
    (_sft, {"shard_index": 1, "shard_count": 3}),
])
def test_iterator_state_restores_exactly(make, kwargs):
  dataset = make(**kwargs)
  it = iter(dataset)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
  expected = [next(it) for _ in range(6)]
  resumed = iter(make(**kwargs))
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(6)], strict=True):
    _assert_batches_equal(a, b)
  fresh = iter(dataset)
  assert any(not np.array_equal(a.tokens, next(fresh).tokens) for a in expected)


def test_long_prompts_raise_or_are_dropped():
  with pytest.raises(ValueError, match="max_prompt_len"):
    next(iter(_prompts(max_prompt_len=4)))  # the shortest prompt, "1+2=" plus BOS, has 5
  # Only one-digit pairs (a quarter of the stream) fit in 5 tokens.
  batches = list(itertools.islice(_prompts(max_prompt_len=5, drop_long=True), 8))
  assert all((b.lengths == 5).all() for b in batches)
  with pytest.raises(ValueError, match="max_len"):
    next(iter(_sft(max_len=10)))


def test_eval_source_never_overlaps_train_source():
  train = pipeline.synthetic_source(TASK, seed=0)
  held_out = pipeline.synthetic_source(TASK, seed=0, split="eval")
  train_prompts = {train[i].prompt for i in range(4000)}
  assert not train_prompts & {held_out[i].prompt for i in range(300)}


def test_eval_prompt_batches_cover_each_example_once():
  examples = tasks.make_eval_set(TASK, size=10, seed=0)
  batches = pipeline.eval_prompt_batches(examples, TOK, batch_size=4, max_prompt_len=12)
  assert len(batches) == 3 and all(b.tokens.shape == (4, 12) for b in batches)
  np.testing.assert_array_equal(batches[-1].valid, [True, True, False, False])
  kept = [e for b in batches for e, v in zip(b.examples, b.valid) if v]
  assert kept == examples
  with pytest.raises(ValueError, match="max_prompt_len"):
    pipeline.eval_prompt_batches(examples, TOK, batch_size=4, max_prompt_len=4)


def test_shards_are_disjoint_and_cover_the_source():
  source = pipeline.synthetic_source(TASK, seed=0, size=24)
  shards = [list(_prompts(source=source, num_epochs=1, shard_index=i, shard_count=2))
            for i in range(2)]
  prompts = [[e.prompt for b in shard for e in b.examples] for shard in shards]
  assert sorted(prompts[0] + prompts[1]) == sorted(source[i].prompt for i in range(24))
  with pytest.raises(ValueError, match="shard_index"):
    _prompts(shard_index=2, shard_count=2)


def test_jsonl_source_split(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text("".join(
      json.dumps({"prompt": f"{i}*3=", "answer": 3 * i}) + "\n" for i in range(200)))
  train = pipeline.jsonl_source(str(path), split="train")
  held_out = pipeline.jsonl_source(str(path), split="eval")
  assert len(train) + len(held_out) == 200
  assert not {e.prompt for e in train} & {e.prompt for e in held_out}
  batch = next(iter(_prompts(source=train, max_prompt_len=8)))
  assert all(int(e.answer) == 3 * int(e.prompt[:-3]) for e in batch.examples)


def test_tokenizer_without_bos(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "</s>": 1, **{str(i): i + 2 for i in range(10)}, "+": 12, "=": 13}
  hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  hf.save(str(tmp_path / "tokenizer.json"))
  tok = tokenizer_lib.load_tokenizer(str(tmp_path), eos_token="</s>")
  batch = next(iter(_prompts(tok=tok)))
  for b, example in enumerate(batch.examples):
    assert batch.lengths[b] == len(example.prompt)  # one token per character, no BOS
    assert tok.decode(batch.tokens[b][batch.mask[b]]).replace(" ", "") == example.prompt
