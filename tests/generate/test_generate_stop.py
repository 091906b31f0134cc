"""Stop rules: EOS, stop tokens, max_new_tokens and MiniMax-M1's repetition early truncation.

End to end, a run with every rule enabled must equal an unrestricted run (same keys) cut exactly
where the rules, evaluated on the unrestricted run's tokens and log-probs, first fire.
"""

import functools

import jax
import numpy as np
import pytest

from m1jax import config, generate, model

FinishReason = generate.FinishReason
N = 32
PROB = 0.8
PROMPT_LENGTHS = (3, 5, 8, 11, 14, 21, 25, 30)
FREE = generate.GenerateConfig(max_new_tokens=N, sampling=generate.SamplingConfig(1.0),
                               eos_token_ids=(), repetition_window=0)


@functools.cache
def _setup():
  """Tiny model with a peaked LM head (top probabilities spread over 0.01-1) and a free run."""
  cfg = config.preset("tiny")
  params = dict(model.init(cfg, jax.random.key(0)))
  params["lm_head"] = params["lm_head"] * 40.0
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
  free = jax.device_get(generate.generate(cfg, params, prompts, FREE, key=jax.random.key(1)))
  return cfg, params, prompts, free


def _expected_stop(tokens, logprobs, eos, stop, window):
  """Reference rule on an unrestricted row -> (length, reason)."""
  run = 0
  for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
    run = run + 1 if np.exp(logprob) > PROB else 0
    if token in eos:
      return i + 1, FinishReason.EOS
    if token in stop:
      return i + 1, FinishReason.STOP_TOKEN
    if run >= window:
      return i + 1, FinishReason.REPETITION
  return len(tokens), FinishReason.LENGTH


def _longest_run(probs):
  longest = run = 0
  for p in probs:
    run = run + 1 if p > PROB else 0
    longest = max(longest, run)
  return longest


def _has_near_miss(probs, window):
  """A run of exactly window - 1 probabilities > PROB followed by one <= PROB."""
  run = 0
  for p in probs:
    if p <= PROB and run == window - 1:
      return True
    run = run + 1 if p > PROB else 0
  return False


def _rules_for(free):
  """Stop rules chosen from the free run so that every finish reason occurs: row 0's first token
  seen in no other row is EOS, row 1's likewise a stop token, and the repetition window is the
  longest high-probability run of rows 2.. (the rows with shorter runs run to the length)."""
  tokens = np.asarray(free.tokens)

  def unique_token(row, start):
    others = set(np.delete(tokens, row, axis=0).ravel().tolist())
    return next(int(t) for t in tokens[row, start:] if int(t) not in others)

  eos = (unique_token(0, 3),)
  stop = (unique_token(1, 5),)
  window = max(_longest_run(np.exp(lp)) for lp in np.asarray(free.logprobs)[2:])
  return eos, stop, window


def test_run_with_all_rules_is_the_free_run_cut_where_a_rule_first_fires():
  cfg, params, prompts, free = _setup()
  eos, stop, window = _rules_for(free)
  assert window >= 2
  rules = generate.GenerateConfig(max_new_tokens=N, sampling=generate.SamplingConfig(1.0),
                                  eos_token_ids=eos, stop_token_ids=stop,
                                  repetition_window=window, repetition_prob=PROB)
  out = jax.device_get(generate.generate(cfg, params, prompts, rules, key=jax.random.key(1)))
  expected = [_expected_stop(t, lp, eos, stop, window)
              for t, lp in zip(free.tokens, free.logprobs)]
  # The case covers every reason, and a near miss (a run of window - 1 that breaks) that must
  # not fire.
  assert {reason for _, reason in expected} == set(FinishReason), expected
  assert any(_has_near_miss(np.exp(logprobs[:length]), window)
             for logprobs, (length, _) in zip(free.logprobs, expected))
  for b, (length, reason) in enumerate(expected):
    assert int(out.lengths[b]) == length, (b, expected[b])
    assert FinishReason(int(out.finish_reasons[b])) == reason, (b, expected[b])
    np.testing.assert_array_equal(out.tokens[b, :length], free.tokens[b, :length])
    np.testing.assert_array_equal(out.logprobs[b, :length], free.logprobs[b, :length])
    assert np.all(out.tokens[b, length:] == rules.pad_id)
    assert np.all(out.logprobs[b, length:] == 0.0)
  np.testing.assert_array_equal(out.completion_mask, np.arange(N)[None] < out.lengths[:, None])


def test_stop_update_repetition_fires_exactly_at_the_window():
  probs = np.array([0.995, 0.999, 0.5, 0.995, 0.995, 0.995, 0.995])
  fires_at = []
  run = np.zeros(1, np.int32)
  for step, p in enumerate(probs):
    run, stops, reason = generate.stop_update(
        np.array([7]), np.log(np.array([p], np.float32)), run, step, eos_ids=(), stop_ids=(),
        max_new_tokens=100, repetition_window=3, repetition_prob=0.99)
    if stops[0]:
      assert int(reason[0]) == FinishReason.REPETITION
      fires_at.append(step)
  assert fires_at == [5, 6]  # the third consecutive p > 0.99 is step 5; 0.5 reset the run


def test_stop_update_priority_and_disabled_repetition():
  tokens = np.array([1, 2, 3, 4])
  logprobs = np.zeros(4, np.float32)  # p = 1 everywhere
  run = np.array([5, 5, 5, 0], np.int32)
  kwargs = dict(eos_ids=(1,), stop_ids=(1, 2), max_new_tokens=8)
  _, stops, reason = generate.stop_update(tokens, logprobs, run, 7, repetition_window=6,
                                          repetition_prob=0.9, **kwargs)
  assert stops.tolist() == [True] * 4
  assert [FinishReason(int(r)) for r in reason] == [
      FinishReason.EOS, FinishReason.STOP_TOKEN, FinishReason.REPETITION, FinishReason.LENGTH]
  new_run, stops, _ = generate.stop_update(tokens, logprobs, run, 0, repetition_window=0,
                                           repetition_prob=0.9, **kwargs)
  assert stops.tolist() == [True, True, False, False]
  np.testing.assert_array_equal(new_run, run)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_prob=1.0), "repetition_prob"),
    (dict(repetition_window=-1), "repetition_window"),
    (dict(kv_dtype="int8"), "kv_dtype"),
    (dict(eos_token_ids=(512,)), "eos_token_ids"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=513), "top_k"),
    (dict(temperature=1.0), "key"),
    (dict(beam_width=2), "beam_width"),
])
def test_bad_arguments_name_the_field(kwargs, field):
  cfg = config.preset("tiny")
  with pytest.raises(ValueError, match=field):
    generate.generate(cfg, {}, [[1, 2]], **{"temperature": 0.0, **kwargs})


@pytest.mark.parametrize("prompts, mask, field", [
    ([[1], []], None, "prompts"),
    (np.array([[1, 2], [3, 4]]), np.array([[True, True], [False, False]]), "prompt_mask"),
    (np.array([[1, 600]]), None, "prompts"),
])
def test_bad_prompts_name_the_argument(prompts, mask, field):
  cfg = config.preset("tiny")
  with pytest.raises(ValueError, match=field):
    generate.generate(cfg, {}, prompts, prompt_mask=mask, temperature=0.0)
