"""Token sampling (greedy, temperature, top-k, top-p) and the log-probs the trainer evaluates.

Log-probs are always those of the temperature-scaled distribution over the FULL vocabulary,
`log_softmax(logits / T)`, whatever top-k / top-p did to the sampling distribution; greedy decoding
(T = 0) reports `log_softmax(logits)` (T = 1). This is the distribution `token_logprobs` gives the
trainer, so a policy-gradient importance ratio pi_theta / pi_old compares like with like.

Top-k / top-p sample from the truncated, renormalised q(x) = p(x) / Z on the kept set (Z, its
mass under p, <= 1), while the reported log p(x) = log q(x) + log Z. Importance ratios computed
from the reported log-probs are thus 1/Z times the ratio against the actual sampler: the
objective treats the behaviour policy as the untruncated p, and tokens outside the kept set are
never sampled although p gives them mass. The bias vanishes as Z -> 1 (top_p = 1, top_k = 0, the
RL setting) and grows with the mass truncation removes. docs/generation.md discusses this.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m1jax import model as model_lib
from m1jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is drawn from the logits.

  temperature: 0 is greedy (argmax); otherwise sample from softmax(logits / temperature).
  top_k: keep the k most likely tokens (0: off). Ties with the k-th logit are kept too.
  top_p: nucleus sampling: keep the most likely tokens until their cumulative probability
    reaches top_p (1: off); applied after top-k to the renormalised top-k distribution, as
    transformers does. Tokens tied with the last kept one are kept too.
  vocab_limit: ids >= vocab_limit are never sampled and their logits are excluded from the
    log-probs (None: the whole vocabulary). Set it to the tokenizer's size when the model's
    vocabulary is padded beyond it; the trainer passes the same value to `token_logprobs`.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature!r}: must be >= 0 (0: greedy)")
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k!r}: must be an integer >= 0 (0: off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p={self.top_p!r}: must be in (0, 1] (1: off)")
    if self.vocab_limit is not None and (not isinstance(self.vocab_limit, int)
                                         or self.vocab_limit < 1):
      raise ValueError(f"SamplingConfig.vocab_limit={self.vocab_limit!r}: must be a positive "
                       "integer or None")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def logprob_temperature(temperature: float) -> float:
  """The temperature of the reported log-probs: `temperature`, or 1 for greedy decoding."""
  return 1.0 if temperature == 0 else float(temperature)


def scaled_logits(logits: jax.Array, temperature: float,
                  vocab_limit: int | None = None) -> jax.Array:
  """logits [..., V] (any float dtype) -> float32 logits / T (T = 1 for greedy), -inf at ids
  >= vocab_limit."""
  scaled = logits.astype(jnp.float32) / logprob_temperature(temperature)
  if vocab_limit is None or vocab_limit >= logits.shape[-1]:
    return scaled
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, scaled, -jnp.inf)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float,
                   vocab_limit: int | None = None) -> jax.Array:
  """log_softmax(logits / T)[token] over the vocabulary (ids < vocab_limit), in float32.

  logits [..., V]; tokens int [...] -> [...]. T = 1 when temperature is 0 (greedy). The sampler
  reports exactly this; the trainer evaluates its log-probs with it too.
  """
  logprobs = jax.nn.log_softmax(scaled_logits(logits, temperature, vocab_limit), axis=-1)
  return _gather(logprobs, tokens)


def token_logprobs_and_entropy(logits: jax.Array, tokens: jax.Array, temperature: float,
                               vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array]:
  """`token_logprobs` and the entropy of the same distribution. logits [..., V]; tokens int [...]
  -> (log-probs [...], entropies [...]) in float32."""
  logprobs = jax.nn.log_softmax(scaled_logits(logits, temperature, vocab_limit), axis=-1)
  terms = jnp.exp(logprobs) * logprobs
  if vocab_limit is not None and vocab_limit < logits.shape[-1]:
    terms = jnp.where(jnp.isfinite(logprobs), terms, 0.0)  # 0 * -inf at the masked ids
  return _gather(logprobs, tokens), -jnp.sum(terms, axis=-1)


def head_token_logprobs(cfg: ModelConfig, hidden: jax.Array, lm_head: jax.Array,
                        tokens: jax.Array, temperature: float, vocab_limit: int | None = None,
                        chunk_tokens: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The LM head, then `token_logprobs_and_entropy`, chunk by chunk: never [B, T, V] at once.

  hidden [B, T, E] (final-normed); lm_head [E, V]; tokens int [B, T] -> (log-probs [B, T],
  entropies [B, T]) float32, equal to token_logprobs_and_entropy(model.lm_head_logits(cfg,
  hidden, lm_head), ...). The time axis goes through in chunks of about chunk_tokens tokens
  (cfg.head_chunk_tokens; all B rows of a few positions, so the batch stays sharded as it is);
  each chunk's logits are recomputed in the backward pass, so training holds O(chunk x V) of
  them; that recomputation and the gradient products multiply by cfg.lm_head_grad_precision.
  """
  batch, length, _ = hidden.shape
  steps = max(1, min(length, (chunk_tokens or cfg.head_chunk_tokens) // batch))
  pad = -length % steps
  chunks = lambda x: jnp.moveaxis(
      jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(
          (batch, -1, steps) + x.shape[2:]), 1, 0)  # [n, B, steps, ...]

  def head(head_cfg):
    @jax.named_scope("lm_head")
    def chunk(h, w, t):
      logits = model_lib.lm_head_logits(head_cfg, h, w)
      return token_logprobs_and_entropy(logits, t, temperature, vocab_limit)
    return chunk

  forward = head(cfg)
  if cfg.lm_head_grad_precision == cfg.lm_head_precision or cfg.jnp_lm_head_dtype != jnp.float32:
    one_chunk = jax.checkpoint(forward)
  else:  # the backward recomputes the chunk at the gradient's precision and differentiates that
    backward = head(cfg.replace(lm_head_precision=cfg.lm_head_grad_precision))
    one_chunk = jax.custom_vjp(forward)

    def save_inputs(h, w, t):
      return forward(h, w, t), (h, w, t)

    def recompute_and_differentiate(inputs, cotangents):
      h, w, t = inputs
      _, vjp = jax.vjp(lambda h, w: backward(h, w, t), h, w)
      return (*vjp(cotangents), None)  # no cotangent for the token ids

    one_chunk.defvjp(save_inputs, recompute_and_differentiate)

  logprobs, entropy = jax.lax.map(lambda args: one_chunk(args[0], lm_head, args[1]),
                                  (chunks(hidden), chunks(tokens)))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, -1)[:, :length]
  return unchunk(logprobs), unchunk(entropy)


def _gather(logprobs: jax.Array, tokens: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logprobs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _top_p_threshold(sorted_logits: jax.Array, top_p: float) -> jax.Array:
  """Smallest logit kept by nucleus filtering. sorted_logits [B, K] descending -> [B, 1]."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first has mass 0
  return jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)


def filter_logits(scaled: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p set to -inf. scaled [B, V] float32 -> [B, V]."""
  if top_k == 0 and top_p == 1.0:
    return scaled
  if top_k:
    sorted_logits = jax.lax.top_k(scaled, min(top_k, scaled.shape[-1]))[0]  # [B, k] descending
  else:
    sorted_logits = -jnp.sort(-scaled, axis=-1)
  threshold = sorted_logits[:, -1:]
  if top_p < 1.0:
    threshold = _top_p_threshold(sorted_logits, top_p)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, config: SamplingConfig) -> jax.Array:
  """Draws one token per row. logits [B, V]; keys: one PRNG key per row [B] -> int32 [B].

  Each row uses only its own key, so a row's token does not depend on the rest of the batch.
  """
  if config.greedy:
    return jnp.argmax(scaled_logits(logits, 0.0, config.vocab_limit), axis=-1).astype(jnp.int32)
  masked = filter_logits(scaled_logits(logits, config.temperature, config.vocab_limit),
                         config.top_k, config.top_p)
  return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
