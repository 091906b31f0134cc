"""Lightning attention layer.

silu(fused per-head qkv) -> decayed linear attention -> norm -> gate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import ModelConfig
from m1jax.model import common
from m1jax.model.norms import RMSNorm
from m1jax.ops import lightning as lightning_ops


class LightningAttention(nn.Module):
  """MiniMax lightning attention (no biases, no RoPE, no 1/sqrt(d), no normaliser).

  `layer_idx` is the GLOBAL layer index (softmax layers counted): it sets the decay slopes.
  """

  cfg: ModelConfig
  layer_idx: int

  @nn.compact
  def __call__(self, h: jax.Array, token_mask: jax.Array | None = None,
               state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """h [B, T, E]; token_mask [B, T] bool (False: padding); state [B, H, D, D] f32 or None.

    Returns (out [B, T, E], final state [B, H, D, D] f32). Padding positions get zero q, k, v,
    so left padding leaves the state untouched.
    """
    cfg = self.cfg
    nh, hd, dtype, pdtype = (cfg.num_attention_heads, cfg.head_dim, cfg.jnp_dtype,
                             cfg.jnp_param_dtype)
    std = cfg.initializer_range
    w_qkv = common.param(self, "qkv", (cfg.hidden_size, nh, 3 * hd), ("embed", "heads", "qkv_dim"),
                         std, pdtype)
    w_gate = common.param(self, "gate", (cfg.hidden_size, nh, hd), ("embed", "heads", "head_dim"),
                          std, pdtype)
    w_out = common.param(self, "out", (nh, hd, cfg.hidden_size), ("heads", "head_dim", "embed"),
                         std, pdtype)

    qkv = jax.nn.silu(common.matmul("bte,ehf->bthf", h, w_qkv, dtype))  # [B, T, H, 3D]
    if token_mask is not None:
      qkv = qkv * token_mask[:, :, None, None].astype(qkv.dtype)
    qkv = common.constrain(qkv, (common.BATCH, common.LENGTH, common.HEADS, None))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    slope = lightning_ops.decay_slopes(nh, self.layer_idx, cfg.num_hidden_layers,
                                       cfg.slope_convention)
    if h.shape[1] == 1 and state is not None:  # Decode: one token on a carried state.
      o, state = lightning_ops.lightning_decode(q[:, 0], k[:, 0], v[:, 0], slope, state,
                                                impl=cfg.lightning_impl)
      o = o[:, None]
    else:
      o, state = lightning_ops.lightning_attention(q, k, v, slope, state, impl=cfg.lightning_impl,
                                                   block_size=cfg.block_size)
    o = RMSNorm(cfg.lightning_norm_eps, ("heads", "head_dim"), pdtype, name="norm")(o.astype(dtype))
    gate = jax.nn.sigmoid(common.matmul("bte,ehd->bthd", h, w_gate, dtype))
    out = common.matmul("bthd,hde->bte", o * gate, w_out, dtype)
    return out, state
