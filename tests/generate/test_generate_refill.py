"""Slot refill (GenerateConfig.slots): every prompt's output equals generating it alone with the
same row id, greedy and sampled, with rows of very different lengths.

float32: the paths differ in summation order only (the ring cache holds a row's keys in other
slots, prefills run at other batch sizes), so tokens are equal and log-probs agree to 1e-5.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from m1jax import config, generate, model

ATOL = 1e-5
EOS = tuple(range(0, 512, 9))  # 57 of 512 ids end a row: lengths spread over 1..N


@functools.cache
def _model():
  cfg = config.preset("tiny", dtype="float32")
  params = dict(model.init(cfg, jax.random.key(0)))
  params["lm_head"] = params["lm_head"] * 40.0
  return cfg, params


def _prompts():
  rng = np.random.default_rng(1)
  return [rng.integers(0, 512, n).tolist() for n in (3, 11, 21, 30, 5, 7, 2, 9, 17, 4)]


def _gen(temperature):
  return generate.GenerateConfig(max_new_tokens=20, repetition_window=4, repetition_prob=0.9,
                                 eos_token_ids=EOS, sampling=generate.SamplingConfig(temperature))


KEY = jax.random.key(2)


@functools.cache
def _alone(temperature):
  cfg, params = _model()
  return [jax.device_get(generate.generate(cfg, params, [prompt], _gen(temperature), key=KEY,
                                           row_ids=[i]))
          for i, prompt in enumerate(_prompts())]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("slots, refill_rows, drain_slots", [(3, 1, -1), (4, 2, -1),
                                                             (5, 2, 3), (4, 1, 0)])
def test_refill_equals_each_prompt_alone(temperature, slots, refill_rows, drain_slots):
  """(3, 1): no drain (a quarter of 3 slots is 0); (4, 2): the last row drains into 1 slot."""
  cfg, params = _model()
  out = jax.device_get(generate.generate(cfg, params, _prompts(), _gen(temperature), key=KEY,
                                         slots=slots, refill_rows=refill_rows,
                                         drain_slots=drain_slots))
  assert len(set(out.lengths.tolist())) > 3  # a long-tailed mix of lengths
  for i, alone in enumerate(_alone(temperature)):
    np.testing.assert_array_equal(out.tokens[i], alone.tokens[0])
    np.testing.assert_allclose(out.logprobs[i], alone.logprobs[0], atol=ATOL, rtol=0)
    assert out.lengths[i] == alone.lengths[0]
    assert out.finish_reasons[i] == alone.finish_reasons[0]


@functools.cache
def _static_and_refill():
  """One greedy static batch and its refill run (4 slots, 1 row a refill), experts recorded:
  the slot-step and routing-replay checks below read the same pair of runs."""
  cfg, params = _model()
  gen = generate.GenerateConfig(max_new_tokens=20, repetition_window=0, eos_token_ids=EOS,
                                sampling=generate.SamplingConfig(0.0), record_experts=True)
  static = jax.device_get(generate.generate(cfg, params, _prompts(), gen))
  refill = jax.device_get(generate.generate(cfg, params, _prompts(), gen, slots=4, refill_rows=1))
  return static, refill


def test_refill_wastes_fewer_slot_steps_than_the_static_batch():
  static, refill = _static_and_refill()
  np.testing.assert_array_equal(static.tokens, refill.tokens)
  useful = int(np.sum(static.lengths - 1))  # decode steps of unfinished rows, either way
  assert static.slot_steps - static.finished_slot_steps == useful
  assert static.decode_steps == np.max(static.lengths) - 1
  assert refill.slot_steps - refill.finished_slot_steps == useful
  assert refill.finished_slot_steps / refill.slot_steps < static.finished_slot_steps / (
      static.slot_steps)


def test_draining_decodes_the_tail_in_fewer_slots():
  """The same rows with and without the drain: equal outputs, the same useful slot-steps, fewer
  slot-steps in all (the tail's steps run 2 slots instead of 5)."""
  cfg, params = _model()
  gen = dataclasses.replace(_gen(0.0), slots=5, refill_rows=2)
  kept = jax.device_get(generate.generate(cfg, params, _prompts(), gen, drain_slots=0))
  drained = jax.device_get(generate.generate(cfg, params, _prompts(), gen, drain_slots=2))
  np.testing.assert_array_equal(drained.tokens, kept.tokens)
  np.testing.assert_array_equal(drained.lengths, kept.lengths)
  useful = int(np.sum(kept.lengths - 1))
  assert kept.slot_steps - kept.finished_slot_steps == useful
  assert drained.slot_steps - drained.finished_slot_steps == useful
  assert drained.slot_steps < kept.slot_steps
  assert kept.slot_steps == 5 * kept.decode_steps
  assert drained.decode_steps == kept.decode_steps  # each step advances every unfinished row


def test_refill_arguments_are_checked():
  with pytest.raises(ValueError, match="refill_rows=5 exceeds slots=4"):
    generate.GenerateConfig(slots=4, refill_rows=5)
  with pytest.raises(ValueError, match="drain_slots=4: .* below slots=4"):
    generate.GenerateConfig(slots=4, drain_slots=4)
  with pytest.raises(ValueError, match="drain_slots=-2"):
    generate.GenerateConfig(slots=4, drain_slots=-2)
  with pytest.raises(ValueError, match="drain_slots=None"):
    generate.GenerateConfig(slots=4, drain_slots=None)
  with pytest.raises(ValueError, match="slots"):
    generate.GenerateConfig(slots=-1)


def test_refill_records_the_experts_of_the_static_batch():
  """Routing replay needs the experts each fed token was routed to: refill records the same."""
  cfg, _ = _model()
  static, refill = _static_and_refill()
  np.testing.assert_array_equal(refill.tokens, static.tokens)
  np.testing.assert_array_equal(refill.experts, static.experts)
  assert static.experts.shape == (10, 20, cfg.num_hidden_layers, cfg.num_experts_per_tok)


def test_refill_of_rows_ending_at_their_first_token():
  """Every row ends at its first token (one new token): the decode steps that run while no slot
  is active write nothing, and no slot-step is counted."""
  cfg, params = _model()
  gen = generate.GenerateConfig(max_new_tokens=1, repetition_window=0,
                                sampling=generate.SamplingConfig(0.0))
  static = jax.device_get(generate.generate(cfg, params, _prompts(), gen))
  refill = jax.device_get(generate.generate(cfg, params, _prompts(), gen, slots=3, refill_rows=2))
  np.testing.assert_array_equal(refill.tokens, static.tokens)
  np.testing.assert_array_equal(refill.lengths, np.ones(len(_prompts())))
  assert int(refill.slot_steps) == int(refill.finished_slot_steps) == 0
  assert int(refill.decode_steps) == 0
