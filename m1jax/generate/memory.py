"""Decode cache size: O(1) lightning states vs a softmax KV cache that grows with the length."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from m1jax.config import DTYPES, ModelConfig


class CacheBytes(NamedTuple):
  """Bytes of a `model.DecodeCache`, by part."""
  lightning: int  # L_lightning * B * H * D * D float32 states: independent of length
  softmax: int  # keys + values: 2 * L_softmax * B * S * KV * D * itemsize(kv_dtype)
  bookkeeping: int  # slot mask [B, S] bool + the int32 write index

  @property
  def total(self) -> int:
    return self.lightning + self.softmax + self.bookkeeping


def cache_bytes(cfg: ModelConfig, batch: int, length: int, kv_dtype=None) -> CacheBytes:
  """Bytes of `model.init_cache(cfg, batch, length, kv_dtype)` without allocating it.

  kv_dtype: a dtype or a name in config.DTYPES; default cfg.dtype (as init_cache). For the released
  456B config in bfloat16 at length 2^20, one sequence holds 70 lightning layers x 4 MiB = 280 MiB
  of states and 10 softmax layers x 2 GiB x 2 (keys, values) = 40 GiB of KV cache.
  """
  for name, value in (("batch", batch), ("length", length)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"cache_bytes: {name}={value!r} must be a positive integer")
  kv_dtype = cfg.jnp_dtype if kv_dtype is None else DTYPES.get(kv_dtype, kv_dtype)
  d = cfg.head_dim
  lightning = cfg.num_lightning_layers * batch * cfg.num_attention_heads * d * d * 4
  softmax = (2 * cfg.num_softmax_layers * batch * length * cfg.num_key_value_heads * d
             * jnp.dtype(kv_dtype).itemsize)
  return CacheBytes(lightning=lightning, softmax=softmax, bookkeeping=batch * length + 4)
