"""The MiniMax decoder.

Embedding, post-norm hybrid layers (lightning / softmax attention + MoE), LM head. The layers are
scanned (`nn.scan`) over groups of one period of the layout (`ModelConfig.layer_period`: 8 for
7 lightning + 1 softmax), so compile time does not grow with depth. Layer l lives in
params["layers"][f"layer_{l % p}"] at row l // p of every leaf (`model.layer_params`).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import ModelConfig
from m1jax.model import common
from m1jax.model.attention import SoftmaxAttention
from m1jax.model.lightning import LightningAttention, layer_slopes
from m1jax.model.moe import MoE, RoutingReplay
from m1jax.model.norms import RMSNorm


@flax.struct.dataclass
class DecodeCache:
  """Generation state: O(1) lightning states and a preallocated softmax KV cache.

  Sequences are left-padded so that every row writes slot `index` at the same step.
  """
  lightning_states: jax.Array  # [L_lightning, B, H, D, D] float32
  # [L_softmax, B, S, KV, D], or a tuple of L_softmax [B, S, KV, D] (`unstack_cache`)
  keys: jax.Array | tuple[jax.Array, ...]
  values: jax.Array | tuple[jax.Array, ...]  # as keys
  slot_mask: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
  index: jax.Array  # int32 []: next slot to write


def init_cache(cfg: ModelConfig, batch: int, max_length: int, kv_dtype=None) -> DecodeCache:
  """An empty cache for `batch` sequences of at most `max_length` tokens (prompt + generation)."""
  kv_shape = (cfg.num_softmax_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
  kv_dtype = cfg.jnp_dtype if kv_dtype is None else kv_dtype
  return DecodeCache(
      lightning_states=jnp.zeros((cfg.num_lightning_layers, batch, cfg.num_attention_heads,
                                  cfg.head_dim, cfg.head_dim), jnp.float32),
      keys=jnp.zeros(kv_shape, kv_dtype), values=jnp.zeros(kv_shape, kv_dtype),
      slot_mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32))


def unstack_cache(cache: DecodeCache) -> DecodeCache:
  """The cache with one KV array per softmax layer, for a forward on `unstack_layer_groups`
  params inside a decode loop: each layer then writes and reads its own buffer in place, where
  with the stacked arrays XLA copies the whole KV cache several times per step."""
  if isinstance(cache.keys, tuple):
    return cache
  return cache.replace(keys=tuple(cache.keys), values=tuple(cache.values))


class DecoderLayer(nn.Module):
  """Post-norm ("DeepNorm") layer.

  h = norm(x); x = a*h + b*Attn(h); h = norm(x); x = a*h + b*MoE(h).
  """

  cfg: ModelConfig
  is_lightning: bool
  fresh_cache: bool = False  # see SoftmaxAttention

  @nn.compact
  def __call__(self, x, positions, token_mask, slope, lightning_state=None, kv_cache=None,
               replay=None, state_row=None):
    """-> (x, attention cache, RouterStats, experts [B, T, k] int32 the MoE routed to).

    lightning_state: [B, H, D, D], or with state_row the stacked states (LightningAttention)."""
    cfg = self.cfg
    pdtype = cfg.jnp_param_dtype
    h = RMSNorm(cfg.rms_norm_eps, ("norm",), pdtype, name="input_norm")(x)
    if self.is_lightning:
      attn_out, layer_cache = LightningAttention(cfg, name="attn")(h, slope, token_mask,
                                                                  lightning_state, state_row)
      alpha, beta = cfg.layernorm_linear_attention_alpha, cfg.layernorm_linear_attention_beta
    else:
      attn_out, layer_cache = SoftmaxAttention(cfg, self.fresh_cache, name="attn")(
          h, positions, token_mask, kv_cache)
      alpha, beta = cfg.layernorm_full_attention_alpha, cfg.layernorm_full_attention_beta
    x = (h if cfg.postnorm else x) * alpha + attn_out * beta
    h = RMSNorm(cfg.rms_norm_eps, ("norm",), pdtype, name="post_attn_norm")(x)
    moe_out, stats, experts = MoE(cfg, name="moe")(h, token_mask, replay)
    x = (h if cfg.postnorm else x) * cfg.layernorm_mlp_alpha + moe_out * cfg.layernorm_mlp_beta
    x = common.constrain(x, (common.BATCH, common.LENGTH, common.EMBED))
    return x, layer_cache, stats, experts


_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_matmuls": jax.checkpoint_policies.save_only_these_names(*common.SAVED_BY_SAVE_MATMULS),
}


class LayerGroup(nn.Module):
  """One period of the layout: cfg.layer_period decoder layers, the body of the layer scan.

  carry: (x [B, T, E], lightning_states [L_lightning, B, H, D, D] or None, keys, values
  [L_softmax, B, S, KV, D], a tuple of [B, S, KV, D] or None); xs: (group index: int32 [] in
  the scan, a Python int when unrolled over unstacked params; slopes [p, H], replayed experts
  [p, B, T, k] or None). Cache rows of group g are g * (layers of that kind per group) + their
  rank within the group. Outputs per group: RouterStats, hidden states [p, B, T, E] and routed
  experts [p, B, T, k] (each None unless requested).
  """

  cfg: ModelConfig
  return_hidden_states: bool = False
  fresh_cache: bool = False
  return_experts: bool = False

  @nn.compact
  def __call__(self, carry, xs, positions, token_mask, slot_mask, index, replay_mask):
    cfg = self.cfg
    x, states, keys, values = carry
    group, slopes, replay_experts = xs
    kinds = cfg.is_lightning[:cfg.layer_period]
    per_group = {True: sum(kinds), False: len(kinds) - sum(kinds)}
    layer_cls = DecoderLayer
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat_policy])
    all_stats, hidden, routed = [], [], []
    rank = {True: 0, False: 0}
    for j, is_lightning in enumerate(kinds):
      layer = layer_cls(cfg, is_lightning, self.fresh_cache, name=f"layer_{j}")
      row = group * per_group[is_lightning] + rank[is_lightning]
      rank[is_lightning] += 1
      replay = (None if replay_experts is None
                else RoutingReplay(replay_experts[j], replay_mask))
      if is_lightning:  # the layer reads and writes row `row` of the stacked states
        x, new_states, stats, experts = layer(
            x, positions, token_mask, slopes[j], states, None, replay,
            None if states is None else jnp.asarray(row, jnp.int32))
        states = None if states is None else new_states
      else:
        kv = None if keys is None else (keys, values, row, slot_mask, index)
        x, new_kv, stats, experts = layer(x, positions, token_mask, slopes[j], None, kv, replay)
        if keys is not None:
          keys, values = new_kv
      all_stats.append(stats)
      if self.return_hidden_states:
        hidden.append(x)
      if self.return_experts:
        routed.append(experts)
    stats = jax.tree.map(lambda *s: jnp.stack(s), *all_stats)
    stack = lambda xs: jnp.stack(xs) if xs else None
    return (x, states, keys, values), (stats, stack(hidden), stack(routed))


class Transformer(nn.Module):
  """Embedding -> scanned layer groups -> final RMSNorm -> untied LM head (cfg.lm_head_dtype)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions=None, token_mask=None, cache: DecodeCache | None = None,
               compute_logits: bool = True, return_hidden_states: bool = False,
               fresh_cache: bool = False, return_experts: bool = False,
               routing_replay: RoutingReplay | None = None,
               unstacked_groups: bool = False) -> dict[str, Any]:
    cfg = self.cfg
    dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
    groups, period = cfg.num_layer_groups, cfg.layer_period
    embedding = common.param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                             cfg.initializer_range, pdtype)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    x = common.constrain(x, (common.BATCH, common.LENGTH, common.EMBED))

    slot_mask = None
    carry = (x, None, None, None)
    if cache is not None:
      new_mask = (jnp.ones(tokens.shape, bool) if token_mask is None else token_mask)
      slot_mask = jax.lax.dynamic_update_slice(cache.slot_mask, new_mask, (0, cache.index))
      carry = (x, cache.lightning_states if cfg.num_lightning_layers else None,
               cache.keys if cfg.num_softmax_layers else None,
               cache.values if cfg.num_softmax_layers else None)
    if cache is not None and isinstance(cache.keys, tuple) and not unstacked_groups:
      raise ValueError("a cache with one KV array per layer (unstack_cache) needs params with "
                       "one array per layer group (unstack_layer_groups)")
    index = None if cache is None else cache.index
    replay_experts = replay_mask = None
    if routing_replay is not None:  # experts [B, T, L, k] -> [G, p, B, T, k]
      replay_experts = jnp.moveaxis(routing_replay.experts, 2, 0).reshape(
          (groups, period) + routing_replay.experts.shape[:2] + routing_replay.experts.shape[3:])
      replay_mask = routing_replay.mask.astype(bool)
    slopes = layer_slopes(cfg).reshape(groups, period, cfg.num_attention_heads)
    group_args = (positions, token_mask, slot_mask, index, replay_mask)
    if unstacked_groups:  # params["layers_{g}"]: the groups one after another (see forward)
      per_group = []
      for g in range(groups):
        layer_group = LayerGroup(cfg, return_hidden_states, fresh_cache, return_experts,
                                 name=f"layers_{g}")
        xs = (g, slopes[g], None if replay_experts is None else replay_experts[g])
        carry, outputs = layer_group(carry, xs, *group_args)
        per_group.append(outputs)
      (x, states, keys, values) = carry
      stats, hidden, routed = jax.tree.map(lambda *a: jnp.stack(a), *per_group)
    else:
      scan = nn.scan(LayerGroup, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                              nn.broadcast),
                     length=groups, unroll=min(cfg.layer_scan_unroll, groups),
                     metadata_params={nn.PARTITION_NAME: "layers"})
      (x, states, keys, values), (stats, hidden, routed) = scan(
          cfg, return_hidden_states, fresh_cache, return_experts, name="layers")(
              carry, (jnp.arange(groups, dtype=jnp.int32), slopes, replay_experts),
              *group_args)

    x = RMSNorm(cfg.rms_norm_eps, ("norm",), pdtype, name="final_norm")(x)
    lm_head = common.param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                           cfg.initializer_range, pdtype)
    by_layer = lambda a: a.reshape((groups * period,) + a.shape[2:])  # [G, p, ...] -> [L, ...]
    out = {"hidden": x, "router_stats": jax.tree.map(by_layer, stats)}
    if compute_logits:
      out["logits"] = lm_head_logits(cfg, x, lm_head)
    if return_hidden_states:
      out["hidden_states"] = tuple(by_layer(hidden))
    if return_experts:  # [G, p, B, T, k] -> [B, T, L, k]
      out["routed_experts"] = jnp.moveaxis(by_layer(routed), 0, 2)
    if cache is not None:
      out["cache"] = DecodeCache(
          lightning_states=cache.lightning_states if states is None else states,
          keys=cache.keys if keys is None else keys,
          values=cache.values if values is None else values, slot_mask=slot_mask,
          index=cache.index + tokens.shape[1])
    return out


_HEAD_ALGORITHMS = {
    "bf16_3x": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "bf16_6x": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "tf32_3x": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


def lm_head_logits(cfg: ModelConfig, hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
  """hidden [..., E] @ lm_head [E, V] in cfg.lm_head_dtype (fp32 option: paper section 3.2);
  a float32 head multiplies by cfg.lm_head_precision (an XLA dot algorithm, or true float32)."""
  head_dtype = cfg.jnp_lm_head_dtype
  precision = None
  if head_dtype == jnp.float32:
    precision = _HEAD_ALGORITHMS.get(cfg.lm_head_precision, jax.lax.Precision.HIGHEST)
  with jax.named_scope("lm_head"):
    logits = jnp.einsum("...e,ev->...v", hidden.astype(head_dtype), lm_head.astype(head_dtype),
                        preferred_element_type=jnp.float32, precision=precision)
    return common.constrain(logits.astype(head_dtype),
                            (common.BATCH, common.LENGTH, "activation_vocab"))
