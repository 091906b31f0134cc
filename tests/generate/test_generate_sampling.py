"""Sampling: greedy is argmax, top-k / top-p stay inside their sets and match their distributions.

Statistical checks draw 8000 tokens with a fixed seed; a frequency's standard error is at most
sqrt(0.25 / 8000) = 0.0056, so 0.025 (4.5 standard errors) is a safe yet discriminating bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import generate

V = 12
DRAWS = 8000
FREQ_ATOL = 0.025
LOGITS = jnp.asarray(np.random.default_rng(0).normal(0.0, 1.5, V), jnp.float32)


def _draw(config, logits=LOGITS, seed=0):
  keys = jax.random.split(jax.random.key(seed), DRAWS)
  batch = jnp.broadcast_to(logits, (DRAWS, V))
  return np.asarray(jax.jit(generate.sample, static_argnums=2)(batch, keys, config))


def _frequencies(samples):
  return np.bincount(samples, minlength=V) / len(samples)


def _renormalised(probs, allowed):
  p = np.where(allowed, probs, 0.0)
  return p / p.sum()


def _probs(temperature=1.0):
  scaled = np.asarray(LOGITS, np.float64) / temperature
  return np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()


def test_temperature_zero_is_argmax_and_needs_no_randomness():
  logits = jax.random.normal(jax.random.key(1), (16, 50))
  keys = jax.random.split(jax.random.key(2), 16)
  tokens = generate.sample(logits, keys, generate.SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
  other = generate.sample(logits, jax.random.split(jax.random.key(3), 16),
                          generate.SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(other, tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_sampling_matches_softmax(temperature):
  freq = _frequencies(_draw(generate.SamplingConfig(temperature)))
  np.testing.assert_allclose(freq, _probs(temperature), rtol=0, atol=FREQ_ATOL)


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_never_leaves_the_k_most_likely(top_k):
  samples = _draw(generate.SamplingConfig(1.0, top_k=top_k))
  allowed = np.zeros(V, bool)
  allowed[np.argsort(-np.asarray(LOGITS))[:top_k]] = True
  assert set(samples.tolist()) == set(np.flatnonzero(allowed).tolist())  # inside and all reached
  np.testing.assert_allclose(_frequencies(samples), _renormalised(_probs(), allowed), rtol=0,
                             atol=FREQ_ATOL)


def _nucleus(probs, top_p):
  order = np.argsort(-probs)
  mass_before = np.cumsum(probs[order]) - probs[order]
  allowed = np.zeros(len(probs), bool)
  allowed[order[mass_before < top_p]] = True
  return allowed


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_never_leaves_the_nucleus(top_p):
  allowed = _nucleus(_probs(), top_p)
  assert 1 <= allowed.sum() < V
  samples = _draw(generate.SamplingConfig(1.0, top_p=top_p))
  assert set(samples.tolist()) == set(np.flatnonzero(allowed).tolist())
  np.testing.assert_allclose(_frequencies(samples), _renormalised(_probs(), allowed), rtol=0,
                             atol=FREQ_ATOL)


def test_top_k_then_top_p_with_temperature():
  # top-p applies to the renormalised top-k distribution of logits / T.
  temperature, top_k, top_p = 0.8, 3, 0.7
  probs = _probs(temperature)
  in_top_k = np.zeros(V, bool)
  in_top_k[np.argsort(-probs)[:top_k]] = True
  allowed = _nucleus(_renormalised(probs, in_top_k), top_p) & in_top_k
  assert not np.array_equal(allowed, _nucleus(probs, top_p) & in_top_k)  # the order matters here
  samples = _draw(generate.SamplingConfig(temperature, top_k=top_k, top_p=top_p))
  assert set(samples.tolist()) == set(np.flatnonzero(allowed).tolist())
  np.testing.assert_allclose(_frequencies(samples), _renormalised(probs, allowed), rtol=0,
                             atol=FREQ_ATOL)


def test_same_keys_same_tokens_and_rows_use_only_their_key():
  config = generate.SamplingConfig(1.0, top_p=0.95)
  logits = jax.random.normal(jax.random.key(4), (6, 40))
  keys = jax.random.split(jax.random.key(5), 6)
  tokens = generate.sample(logits, keys, config)
  np.testing.assert_array_equal(generate.sample(logits, keys, config), tokens)
  alone = [int(generate.sample(logits[b:b + 1], keys[b:b + 1], config)[0]) for b in range(6)]
  np.testing.assert_array_equal(alone, tokens)


def test_token_logprobs_are_full_vocab_temperature_scaled():
  # Float32 log-softmax of 40 logits against float64: a few ulp.
  logits = jax.random.normal(jax.random.key(6), (3, 40)) * 3
  tokens = jnp.array([0, 17, 39])
  for temperature, effective in ((0.0, 1.0), (1.0, 1.0), (0.6, 0.6)):
    scaled = np.asarray(logits, np.float64) / effective
    log_z = np.log(np.exp(scaled).sum(-1))
    expected = scaled[np.arange(3), tokens] - log_z
    np.testing.assert_allclose(generate.token_logprobs(logits, tokens, temperature), expected,
                               rtol=1e-6, atol=1e-6)


def test_filter_logits_keeps_ties_and_the_top_token():
  logits = jnp.array([[2.0, 1.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
  kept = np.isfinite(generate.filter_logits(logits, top_k=2))
  np.testing.assert_array_equal(kept, [[True, True, True, False], [True, True, True, True]])
  kept = np.isfinite(generate.filter_logits(logits, top_p=1e-3))
  np.testing.assert_array_equal(kept, [[True, False, False, False], [True, False, False, False]])


def test_head_token_logprobs_equal_the_unchunked_head():
  """The chunked LM head + log-probs compute exactly token_logprobs_and_entropy of the head's
  logits: bit for bit on each chunk's rows (the same ops on the same [B, steps] slice), and so
  on the whole batch when one chunk covers it. Across chunk sizes the head's matmul sees other
  row counts, whose blocking may round differently (Eigen on CPU does): float32, so 1e-6
  relative. The backward recomputes each chunk's logits: the same gradients to 2e-5 (float32)."""
  from m1jax import config, model  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(3), 3)
  for head_dtype in ("float32", "bfloat16"):
    cfg = config.preset("tiny", lm_head_dtype=head_dtype)
    hidden = jax.random.normal(keys[0], (3, 7, cfg.hidden_size))
    lm_head = jax.random.normal(keys[1], (cfg.hidden_size, cfg.vocab_size)) * 0.3
    tokens = jax.random.randint(keys[2], (3, 7), 0, cfg.vocab_size)
    unchunked = jax.jit(lambda h, w, t, limit: generate.token_logprobs_and_entropy(
        model.lm_head_logits(cfg, h, w), t, 0.7, limit), static_argnums=3)
    for limit in (None, 300):
      whole = unchunked(hidden, lm_head, tokens, limit)
      for chunk_tokens, steps in ((3, 1), (6, 2), (15, 5), (21, 7), (100, 7)):
        got = jax.jit(lambda h, w: generate.head_token_logprobs(
            cfg, h, w, tokens, 0.7, limit, chunk_tokens=chunk_tokens))(hidden, lm_head)
        pad = -7 % steps  # the last chunk is padded to `steps` positions
        padded = (jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))), jnp.pad(tokens, ((0, 0), (0, pad))))
        for start in range(0, 7, steps):
          part = slice(start, start + steps)
          piece = unchunked(padded[0][:, part], lm_head, padded[1][:, part], limit)
          np.testing.assert_array_equal(got[0][:, part], piece[0][:, :7 - start])
          np.testing.assert_array_equal(got[1][:, part], piece[1][:, :7 - start])
        if head_dtype == "float32":
          tolerance = dict(rtol=1e-6)
        else:
          largest = float(jnp.max(jnp.abs(model.lm_head_logits(cfg, hidden, lm_head))))
          tolerance = dict(rtol=0, atol=2 * 2**-8 * largest / 0.7)
        np.testing.assert_allclose(got[0], whole[0], **tolerance)
        np.testing.assert_allclose(got[1], whole[1], **tolerance)
        if steps == 7:
          np.testing.assert_array_equal(got[0], whole[0])
        assert np.all(np.isfinite(got[1]))
      if head_dtype != "float32":
        continue  # gradients through a bf16 head are bf16-rounded: the float32 case checks them
      loss = lambda fn: lambda h, w: jnp.sum(fn(h, w)[0]) + jnp.sum(fn(h, w)[1])
      grad_want = jax.grad(loss(lambda h, w: unchunked(h, w, tokens, limit)),
                           argnums=(0, 1))(hidden, lm_head)
      grad_got = jax.grad(loss(lambda h, w: generate.head_token_logprobs(
          cfg, h, w, tokens, 0.7, limit, chunk_tokens=6)), argnums=(0, 1))(hidden, lm_head)
      for g, w in zip(grad_got, grad_want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(w))))


def test_lm_head_grad_precision_reaches_only_the_backward():
  """lm_head_grad_precision: the log-probs are those of lm_head_precision bit for bit; the
  backward's three matmuls (recomputed logits, both gradient products) run the other algorithm
  and nothing in the forward does; the gradients equal the default's to float32 rounding (XLA:CPU
  computes bf16_3x in plain float32). An unknown name is rejected naming the field."""
  from m1jax import config  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(4), 3)
  default = config.preset("tiny")
  assert (default.lm_head_precision, default.lm_head_grad_precision) == ("bf16_3x", "bf16_3x")
  fast = default.replace(lm_head_precision="highest")  # the backward keeps the default bf16_3x
  cfg = fast.replace(lm_head_grad_precision="highest")
  hidden = jax.random.normal(keys[0], (2, 5, cfg.hidden_size))
  lm_head = jax.random.normal(keys[1], (cfg.hidden_size, cfg.vocab_size)) * 0.3
  tokens = jax.random.randint(keys[2], (2, 5), 0, cfg.vocab_size)

  def loss(c):
    return lambda h, w: jnp.sum(generate.head_token_logprobs(c, h, w, tokens, 0.7,
                                                             chunk_tokens=4)[0])

  def algorithms(fn):
    return str(jax.make_jaxpr(fn)(hidden, lm_head)).count("BF16_BF16_F32_X3")

  np.testing.assert_array_equal(jax.jit(loss(fast))(hidden, lm_head),
                                jax.jit(loss(cfg))(hidden, lm_head))
  assert algorithms(loss(fast)) == 0
  assert algorithms(jax.grad(loss(fast), argnums=(0, 1))) == 3
  assert algorithms(jax.grad(loss(cfg), argnums=(0, 1))) == 0
  grads = [jax.jit(jax.grad(loss(c), argnums=(0, 1)))(hidden, lm_head) for c in (cfg, fast)]
  for g, w in zip(*grads[::-1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(w))))
  with pytest.raises(ValueError, match="lm_head_grad_precision"):
    cfg.replace(lm_head_grad_precision="bf16")

def test_vocab_limit_is_never_sampled_and_excluded_from_logprobs():
  logits = jnp.tile(jnp.arange(10, dtype=jnp.float32), (256, 1))  # the highest ids most likely
  keys = jax.random.split(jax.random.key(0), 256)
  for config in (generate.SamplingConfig(1.0, vocab_limit=6),
                 generate.SamplingConfig(0.0, vocab_limit=6),
                 generate.SamplingConfig(2.0, top_k=8, vocab_limit=6)):
    tokens = generate.sample(logits, keys, config)
    assert int(tokens.max()) <= 5
  assert int(generate.sample(logits, keys, generate.SamplingConfig(0.0)).max()) == 9
  logprobs = jax.nn.log_softmax(logits[0, :6])
  got = generate.token_logprobs(logits[:1], jnp.array([5]), 1.0, vocab_limit=6)
  np.testing.assert_allclose(got, logprobs[5:6], rtol=1e-6)
  # Ids at or above the limit have probability 0 (log-prob -inf).
  assert float(generate.token_logprobs(logits[:1], jnp.array([7]), 1.0, vocab_limit=6)[0]) == (
      -np.inf)
  with pytest.raises(ValueError, match="vocab_limit"):
    generate.SamplingConfig(vocab_limit=0)
