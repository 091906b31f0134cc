"""Slot refill (GenerateConfig.slots): every prompt's output equals generating it alone with the
same row id, greedy and sampled, with rows of very different lengths.

float32: the paths differ in summation order only (the ring cache holds a row's keys in other
slots, prefills run at other batch sizes), so tokens are equal and log-probs agree to 1e-5.
"""

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
@pytest.mark.parametrize("slots, refill_rows", [(3, 1), (4, 2)])
def test_refill_equals_each_prompt_alone(temperature, slots, refill_rows):
  cfg, params = _model()
  out = jax.device_get(generate.generate(cfg, params, _prompts(), _gen(temperature), key=KEY,
                                         slots=slots, refill_rows=refill_rows))
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
  assert refill.slot_steps - refill.finished_slot_steps == useful
  assert refill.finished_slot_steps / refill.slot_steps < static.finished_slot_steps / (
      static.slot_steps)


def test_refill_arguments_are_checked():
  with pytest.raises(ValueError, match="refill_rows=5 exceeds slots=4"):
    generate.GenerateConfig(slots=4, refill_rows=5)
  with pytest.raises(ValueError, match="slots"):
    generate.GenerateConfig(slots=-1)


def test_refill_records_the_experts_of_the_static_batch():
  """Routing replay needs the experts each fed token was routed to: refill records the same."""
  cfg, _ = _model()
  static, refill = _static_and_refill()
  np.testing.assert_array_equal(refill.tokens, static.tokens)
  np.testing.assert_array_equal(refill.experts, static.experts)
  assert static.experts.shape == (10, 20, cfg.num_hidden_layers, cfg.num_experts_per_tok)
