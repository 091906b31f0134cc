"""Lightning attention layer.

silu(fused per-head qkv) -> decayed linear attention -> norm -> gate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from m1jax.config import ModelConfig
from m1jax.model import common
from m1jax.model.norms import RMSNorm


def decay_slopes(num_heads: int, layer_idx: int, num_layers: int,
                 convention: str = "original") -> jax.Array:
  """slope_h = 2^(-8(h+1)/H) * (1 - l/(L-1) + 1e-5) for GLOBAL layer index l; [H] float32.

  convention "transformers" uses the denominator L - 1 + 1e-5. A single-layer model uses factor 1.
  """
  base = 2.0 ** (-8.0 * (jnp.arange(num_heads, dtype=jnp.float32) + 1) / num_heads)
  if convention == "transformers":
    denominator = num_layers - 1 + 1e-5
  elif convention == "original":
    denominator = max(num_layers - 1, 1)
  else:
    raise ValueError(f"slope convention {convention!r}; choose 'original' or 'transformers'")
  return base * (1.0 - layer_idx / denominator + 1e-5)


def layer_slopes(cfg: ModelConfig) -> jax.Array:
  """decay_slopes of every layer (softmax layers included, unused there): [L, H] float32."""
  return jnp.stack([decay_slopes(cfg.num_attention_heads, layer, cfg.num_hidden_layers,
                                 cfg.slope_convention)
                    for layer in range(cfg.num_hidden_layers)])


def _interpret() -> bool:
  """Pallas kernels run compiled on a GPU and in the interpreter elsewhere (CPU tests)."""
  return jax.default_backend() != "gpu"


class LightningAttention(nn.Module):
  """MiniMax lightning attention (no biases, no RoPE, no 1/sqrt(d), no normaliser)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array, slope: jax.Array, token_mask: jax.Array | None = None,
               state: jax.Array | None = None,
               state_row: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """h [B, T, E]; slope [H] (this layer's decay_slopes); token_mask [B, T] bool (False:
    padding); state [B, H, D, D] f32 or None, or with state_row (int32 []) the stacked states
    [L_lightning, B, H, D, D] of which row state_row is this layer's.

    Returns (out [B, T, E], final state in the form given: [B, H, D, D] f32, or the stack with
    row state_row replaced; a decode step with lightning_impl "pallas" updates that row in
    place). Padding positions get zero q, k, v, so left padding leaves the state untouched.
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
    if h.shape[1] == 1 and state is not None:  # Decode: one token on a carried state.
      o, state = pallas_kernels.lightning_attention_decode(
          q[:, 0], k[:, 0], v[:, 0], slope, state, state_row, impl=cfg.lightning_impl,
          interpret=_interpret())
      o = o[:, None]
    else:
      initial = state if state_row is None or state is None else state[state_row]
      o, final = pallas_kernels.lightning_attention(
          q, k, v, slope, initial, impl=cfg.lightning_impl, config=cfg.lightning_kernel,
          interpret=_interpret(), block_size=cfg.block_size)
      o = checkpoint_name(o, common.ATTENTION_OUTPUT)
      state = (final if state_row is None or state is None
               else jax.lax.dynamic_update_index_in_dim(state, final, state_row, axis=0))
    o = RMSNorm(cfg.lightning_norm_eps, ("heads", "head_dim"), pdtype, name="norm")(o.astype(dtype))
    gate = jax.nn.sigmoid(common.matmul("bte,ehd->bthd", h, w_gate, dtype))
    out = common.matmul("bthd,hde->bte", o * gate, w_out, dtype)
    return out, state
