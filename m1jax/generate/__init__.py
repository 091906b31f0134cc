"""The sampler for RL and evaluation: batched prefill + jit-compiled decode, KV cache, O(1) states.

    out = generate.generate(cfg, params, [[1, 5, 7], [1, 9]], max_new_tokens=64, temperature=0.7,
                            top_p=0.95, key=jax.random.key(0))
    out.tokens, out.logprobs  # [B, N]; out.lengths, out.finish_reasons [B]

docs/generation.md describes the padding convention, the log-probs returned and the stop rules.
"""

from m1jax.generate.engine import FinishReason
from m1jax.generate.engine import GenerateConfig
from m1jax.generate.engine import GenerateOutput
from m1jax.generate.engine import generate
from m1jax.generate.engine import stop_update
from m1jax.generate.memory import CacheBytes
from m1jax.generate.memory import cache_bytes
from m1jax.generate.sampling import SamplingConfig
from m1jax.generate.sampling import filter_logits
from m1jax.generate.sampling import head_token_logprobs
from m1jax.generate.sampling import sample
from m1jax.generate.sampling import token_logprobs
from m1jax.generate.sampling import token_logprobs_and_entropy

__all__ = ["FinishReason", "GenerateConfig", "GenerateOutput", "generate", "stop_update",
           "CacheBytes", "cache_bytes", "SamplingConfig", "filter_logits", "head_token_logprobs",
           "sample", "token_logprobs", "token_logprobs_and_entropy"]
