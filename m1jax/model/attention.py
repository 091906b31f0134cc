"""Softmax attention layer: GQA with partial NeoX RoPE, via jax.nn.dot_product_attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import ModelConfig
from m1jax.model import common
from m1jax.model.rope import apply_rope


def _implementation(cfg: ModelConfig, dtype, needs_mask: bool) -> str:
  """cuDNN flash attention where it applies (GPU, 16-bit, causal without an explicit mask)."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  usable = (jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
            and not needs_mask and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0)
  return "cudnn" if usable else "xla"


class SoftmaxAttention(nn.Module):
  """Causal GQA: q heads share kv head i // (H / KV); scale head_dim^-0.5; RoPE on rotary dims."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array, positions: jax.Array, token_mask: jax.Array | None = None,
               kv_cache: tuple | None = None):
    """h [B, T, E]; positions int [B, T]; token_mask [B, T] bool (False: padding).

    kv_cache: (keys [L_softmax, B, S, KV, D], values (same), layer (this layer's row), slot_mask
    [B, S] bool, index int32 []): the T new keys/values are written in place at slots
    index..index+T-1 of row `layer`, and queries attend to filled, non-padding slots at or before
    their own. Returns (out [B, T, E], (keys, values) updated, or None).
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

    if kv_cache is None:
      mask = None if token_mask is None else token_mask[:, None, None, :]  # key padding
      o = jax.nn.dot_product_attention(
          q, k, v, mask=mask, is_causal=True, scale=scale,
          implementation=_implementation(cfg, dtype, mask is not None))
      new_kv = None
    else:
      keys, values, layer, slot_mask, index = kv_cache
      t, s = h.shape[1], keys.shape[2]
      keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype)[None], (layer, 0, index, 0, 0))
      values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype)[None],
                                            (layer, 0, index, 0, 0))
      causal = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S]
      mask = slot_mask[:, None, None, :] & causal[None, None]
      o = jax.nn.dot_product_attention(q, keys[layer].astype(dtype), values[layer].astype(dtype),
                                       mask=mask, scale=scale, implementation="xla")
      new_kv = (keys, values)
    out = common.matmul("bthd,hde->bte", o, w_o, dtype)
    return out, new_kv
