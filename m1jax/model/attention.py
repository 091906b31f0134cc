"""Softmax attention layer: GQA with partial NeoX RoPE, via jax.nn.dot_product_attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from m1jax.config import ModelConfig
from m1jax.model import common
from m1jax.model.rope import apply_rope


def _implementation(cfg: ModelConfig, dtype) -> str:
  """cuDNN flash attention where it applies (GPU, 16-bit, head_dim <= 128 and a multiple of 8)."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  usable = (jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
            and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0)
  return "cudnn" if usable else "xla"


def causal_attention(q, k, v, token_mask, scale: float, implementation: str):
  """Causal (GQA) attention of every position over the real tokens at or before it.

  q [B, T, H, D]; k, v [B, T, KV, D]; token_mask [B, T] bool or None. Each row's real tokens
  are one contiguous run (left and/or right padding: every batch m1jax builds). "xla" applies
  the mask to the [T, T] scores; "cudnn" (flash attention, no score matrix) takes sequence
  lengths, so rows are rotated to start at their first real token, attended with lengths, and
  rotated back. Outputs at padding positions are finite and meaningless.
  """
  if token_mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                        implementation=implementation)
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, mask=token_mask[:, None, None, :],
                                        is_causal=True, scale=scale, implementation="xla")
  return _packed_attention(q, k, v, token_mask, scale, implementation)


def _packed_attention(q, k, v, token_mask, scale: float, implementation: str):
  """causal_attention by sequence lengths: rows rotated left by their leading padding."""
  t = q.shape[1]
  start = jnp.argmax(token_mask, axis=1).astype(jnp.int32)  # first real token (0 if none)
  lengths = jnp.sum(token_mask, axis=1, dtype=jnp.int32)
  rotate = lambda x, shift: jnp.take_along_axis(
      x, ((jnp.arange(t)[None] + shift[:, None]) % t)[:, :, None, None], axis=1)
  o = jax.nn.dot_product_attention(
      rotate(q, start), rotate(k, start), rotate(v, start), is_causal=True, scale=scale,
      query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
  return rotate(o, -start)


class SoftmaxAttention(nn.Module):
  """Causal GQA: q heads share kv head i // (H / KV); scale head_dim^-0.5; RoPE on rotary dims."""

  cfg: ModelConfig
  fresh_cache: bool = False  # with a cache: it holds nothing yet (a prefill from slot 0)

  @nn.compact
  def __call__(self, h: jax.Array, positions: jax.Array, token_mask: jax.Array | None = None,
               kv_cache: tuple | None = None):
    """h [B, T, E]; positions int [B, T]; token_mask [B, T] bool (False: padding).

    kv_cache: (keys [L_softmax, B, S, KV, D] or a tuple of L_softmax [B, S, KV, D], values
    (same), layer (this layer's row; a Python int with tuples), slot_mask [B, S] bool, index
    int32 []): the T new keys/values are written in place at slots index..index+T-1 of row
    `layer`, and queries attend to filled, non-padding slots at or before
    their own (with fresh_cache, index is 0 and they attend to the new tokens only, as without a
    cache). Returns (out [B, T, E], (keys, values) updated, or None).
    """
    cfg = self.cfg
    nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype, pdtype, std = cfg.jnp_dtype, cfg.jnp_param_dtype, cfg.initializer_range
    w_q = common.param(self, "q", (cfg.hidden_size, nh, hd), ("embed", "heads", "head_dim"),
                       std, pdtype)
    w_k = common.param(self, "k", (cfg.hidden_size, kvh, hd), ("embed", "kv_heads", "head_dim"),
                       std, pdtype)
    w_v = common.param(self, "v", (cfg.hidden_size, kvh, hd), ("embed", "kv_heads", "head_dim"),
                       std, pdtype)
    w_o = common.param(self, "o", (nh, hd, cfg.hidden_size), ("heads", "head_dim", "embed"),
                       std, pdtype)

    q = common.matmul("bte,ehd->bthd", h, w_q, dtype)
    k = common.matmul("bte,ehd->bthd", h, w_k, dtype)
    v = common.matmul("bte,ehd->bthd", h, w_v, dtype)
    q = apply_rope(q, positions, cfg.effective_rotary_dim, cfg.rope_theta)
    k = apply_rope(k, positions, cfg.effective_rotary_dim, cfg.rope_theta)
    q = common.constrain(q, (common.BATCH, common.LENGTH, common.HEADS, None))
    k = common.constrain(k, (common.BATCH, common.LENGTH, common.KV_HEADS, None))
    v = common.constrain(v, (common.BATCH, common.LENGTH, common.KV_HEADS, None))
    scale = hd ** -0.5

    new_kv = None
    if kv_cache is not None:
      keys, values, layer, slot_mask, index = kv_cache
      if isinstance(keys, tuple):  # one array per layer (`unstack_cache`): layer is static
        write = lambda cache, new: jax.lax.dynamic_update_slice(
            cache, new.astype(cache.dtype), (0, index, 0, 0))
        keys = keys[:layer] + (write(keys[layer], k),) + keys[layer + 1:]
        values = values[:layer] + (write(values[layer], v),) + values[layer + 1:]
      else:
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype)[None],
                                            (layer, 0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype)[None],
                                              (layer, 0, index, 0, 0))
      new_kv = (keys, values)
    if kv_cache is None or self.fresh_cache:
      o = checkpoint_name(causal_attention(q, k, v, token_mask, scale, _implementation(cfg, dtype)),
                          common.ATTENTION_OUTPUT)
    else:
      if h.shape[1] == 1:  # decode: every filled slot is in the past (the cache may be a ring)
        mask = slot_mask[:, None, None, :]
      else:
        t, s = h.shape[1], slot_mask.shape[1]
        causal = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S]
        mask = slot_mask[:, None, None, :] & causal[None, None]
      o = jax.nn.dot_product_attention(q, keys[layer].astype(dtype), values[layer].astype(dtype),
                                       mask=mask, scale=scale, implementation="xla")
    out = common.matmul("bthd,hde->bte", o, w_o, dtype)
    return out, new_kv
