"""The sampler against teacher forcing, batched against alone, prefill against per-token steps.

The tiny model's LM head is scaled by 40 so that next-token distributions are peaked (top
probabilities from ~0.01 to ~1, like a trained model) rather than nearly uniform.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import config, generate, model

# fp32: the sampler (blockwise prefill + one-token recurrent steps over a KV cache) and a full
# forward (one blockwise pass, masked attention) differ only in summation order: ~1e-6 on
# log-probs of magnitude <= ~10.
FP32_ATOL = 1e-5
PROMPT_LENGTHS = (3, 11, 21, 30)  # mixed; 21 and 30 exceed block_size 16
TEMPERATURE = 0.7
GEN = generate.GenerateConfig(
    max_new_tokens=24, sampling=generate.SamplingConfig(TEMPERATURE, top_k=40, top_p=0.9),
    repetition_window=0)
KEY = jax.random.key(7)


@functools.cache
def _model(dtype):
  cfg = config.preset("tiny", dtype=dtype)
  params = dict(model.init(cfg, jax.random.key(0)))
  params["lm_head"] = params["lm_head"] * 40.0
  return cfg, params


def _prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 512, n).tolist() for n in PROMPT_LENGTHS]


@functools.cache
def _batched(dtype):
  cfg, params = _model(dtype)
  return jax.device_get(generate.generate(cfg, params, _prompts(), GEN, key=KEY))


@functools.cache
def _forward_logits(cfg):
  return jax.jit(lambda p, t, m: model.forward(cfg, p, t, token_mask=m).logits)


def _teacher_forced(cfg, params, out, temperature):
  """log softmax(logits / T) of the generated tokens under one full forward: [B, N]."""
  width = out.prompt_tokens.shape[1]
  logits = _forward_logits(cfg)(params, out.sequences, out.sequence_mask)
  logits = logits[:, width - 1:-1].astype(jnp.float32) / temperature
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logprobs, out.tokens[..., None], axis=-1)[..., 0]
  return np.where(out.completion_mask, picked, 0.0)


def test_logprobs_match_teacher_forcing_fp32():
  cfg, params = _model("float32")
  out = _batched("float32")
  assert out.tokens.shape == (len(PROMPT_LENGTHS), GEN.max_new_tokens)
  np.testing.assert_array_equal(out.prompt_lengths, PROMPT_LENGTHS)
  assert np.all(out.lengths == GEN.max_new_tokens)
  assert np.all(out.finish_reasons == generate.FinishReason.LENGTH)
  reference = _teacher_forced(cfg, params, out, TEMPERATURE)
  np.testing.assert_allclose(out.logprobs, reference, rtol=0, atol=FP32_ATOL)
  # The check has teeth: log-probs at T = 1 differ by far more than the tolerance.
  assert np.abs(_teacher_forced(cfg, params, out, 1.0) - reference).max() > 100 * FP32_ATOL


def test_logprobs_match_teacher_forcing_bf16():
  # bf16 activations: the incremental and full-sequence computations round differently. We
  # require the mismatch to be no larger than the bf16 rounding noise of the model itself,
  # measured as |bf16 teacher forcing - fp32 teacher forcing| on the same tokens (2x margin),
  # and below 4 bf16 ulps (4 * 2^-8) relative to the largest scaled logit. Measured on this
  # case: mismatch max 0.076 / mean 0.017; bf16-vs-fp32 noise max 0.070 / mean 0.019.
  cfg, params = _model("bfloat16")
  cfg32, _ = _model("float32")
  out = _batched("bfloat16")
  reference = _teacher_forced(cfg, params, out, TEMPERATURE)
  mismatch = np.abs(out.logprobs - reference)
  noise = np.abs(_teacher_forced(cfg32, params, out, TEMPERATURE) - reference)
  logits = _forward_logits(cfg32)(params, out.sequences, out.sequence_mask)
  scale = float(jnp.abs(logits).max()) / TEMPERATURE
  assert mismatch.max() <= 2 * noise.max(), (mismatch.max(), noise.max())
  assert mismatch.mean() <= 2 * noise.mean(), (mismatch.mean(), noise.mean())
  assert mismatch.max() <= 4 * 2.0 ** -8 * scale, (mismatch.max(), scale)


def test_batched_equals_each_prompt_alone():
  cfg, params = _model("float32")
  batched = _batched("float32")
  for row, prompt in enumerate(_prompts()):
    alone = generate.generate(cfg, params, [prompt], GEN, key=KEY, row_ids=[row])
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[row])
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[row], rtol=0, atol=FP32_ATOL)
    assert int(alone.lengths[0]) == int(batched.lengths[row])
    assert int(alone.finish_reasons[0]) == int(batched.finish_reasons[row])


def test_array_prompts_left_or_right_padded_equal_token_lists():
  cfg, params = _model("float32")
  batched = _batched("float32")
  prompts = _prompts()
  width = batched.prompt_tokens.shape[1]
  tokens = np.full((len(prompts), width), 5, np.int32)  # padding value must not matter
  mask = np.zeros((len(prompts), width), bool)
  for b, prompt in enumerate(prompts):
    tokens[b, :len(prompt)] = prompt
    mask[b, :len(prompt)] = True
  right = generate.generate(cfg, params, tokens, GEN, prompt_mask=mask, key=KEY)
  np.testing.assert_array_equal(right.prompt_tokens, batched.prompt_tokens)
  np.testing.assert_array_equal(right.tokens, batched.tokens)
  np.testing.assert_array_equal(right.logprobs, batched.logprobs)
  left = generate.generate(cfg, params, batched.prompt_tokens, GEN,
                           prompt_mask=batched.prompt_mask, key=KEY)
  np.testing.assert_array_equal(left.tokens, batched.tokens)


def test_generate_inside_jit_equals_the_plain_call():
  # Traced prompts, mask and key skip the host-side checks; the program is the same one.
  cfg, params = _model("float32")
  batched = _batched("float32")
  inside = jax.jit(lambda p, t, m, k: generate.generate(cfg, p, t, GEN, prompt_mask=m, key=k))(
      params, batched.prompt_tokens, batched.prompt_mask, KEY)
  np.testing.assert_array_equal(inside.tokens, batched.tokens)
  np.testing.assert_array_equal(inside.logprobs, batched.logprobs)


def test_seeds_reproduce_and_differ():
  cfg, params = _model("float32")
  batched = _batched("float32")
  again = generate.generate(cfg, params, _prompts(), GEN, key=KEY)
  np.testing.assert_array_equal(again.tokens, batched.tokens)
  np.testing.assert_array_equal(again.logprobs, batched.logprobs)
  other = generate.generate(cfg, params, _prompts(), GEN, key=jax.random.key(8))
  assert np.mean(np.asarray(other.tokens) != batched.tokens) > 0.5


def test_lightning_state_after_prefill_equals_single_token_steps():
  # 37 tokens: more than block_size 16 and not a multiple of it. Row 1 is left-padded by 5: its
  # padding must leave the state at zero. fp32 states are sums of ~37 outer products of O(1)
  # vectors; prefill (blockwise) and steps (recurrence) differ in summation order only: 1e-5
  # relative to the largest state entry.
  cfg, params = _model("float32")
  batch, length, pad = 2, 37, 5
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, cfg.vocab_size)
  mask = jnp.ones((batch, length), bool).at[1, :pad].set(False)
  positions = model.positions_from_mask(mask, tokens.shape)
  forward = jax.jit(lambda p, t, m, pos, c: model.forward(cfg, p, t, token_mask=m, positions=pos,
                                                          cache=c).cache)
  empty = model.init_cache(cfg, batch, length)
  prefill = forward(params, tokens, mask, positions, empty)
  stepped = empty
  for t in range(length):
    stepped = forward(params, tokens[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1], stepped)
  scale = float(jnp.abs(prefill.lightning_states).max())
  assert scale > 0
  np.testing.assert_allclose(stepped.lightning_states, prefill.lightning_states, rtol=0,
                             atol=1e-5 * scale)
  np.testing.assert_allclose(stepped.keys, prefill.keys, rtol=0, atol=1e-5)
