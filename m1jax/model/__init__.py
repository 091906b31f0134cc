"""The hybrid lightning-attention MoE model as pure functions over a plain params pytree.

    params = model.init(cfg, jax.random.key(0))
    out = model.forward(cfg, params, tokens)  # out.logits [B, T, V], out.aux_loss []
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import ModelConfig
from m1jax.model.moe import RouterStats, aux_loss
from m1jax.model.transformer import DecodeCache, Transformer, init_cache, lm_head_logits

__all__ = ["ModelOutput", "DecodeCache", "init", "abstract_params", "forward", "init_cache",
           "logical_axes", "param_counts", "lm_head_logits", "positions_from_mask"]


class ModelOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, V] in cfg.lm_head_dtype (None when compute_logits=False)
  # [] MoE load-balancing loss (unscaled; times router_aux_loss_coef in training)
  aux_loss: jax.Array
  hidden: jax.Array  # [B, T, E] final-normed hidden states
  router_stats: RouterStats  # fields stacked over layers
  cache: DecodeCache | None  # updated cache when one was passed
  hidden_states: tuple[jax.Array, ...] | None  # per-layer outputs [B, T, E] when requested


def _module(cfg: ModelConfig) -> Transformer:
  return Transformer(cfg)


def _abstract_variables(cfg: ModelConfig):
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(
      lambda t: _module(cfg).init(jax.random.key(0), t, jnp.zeros((1, 1), jnp.int32),
                                  compute_logits=False), tokens)


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
  """The params pytree as jax.ShapeDtypeStructs (nothing is allocated)."""
  return nn.meta.unbox(_abstract_variables(cfg)["params"])


def init(cfg: ModelConfig, key: jax.Array, shardings=None) -> dict[str, Any]:
  """Random parameters as a plain pytree: normal(0, initializer_range) matrices, ones for norms.

  Shapes come from the modules (jax.eval_shape). The numbers are drawn on the host with numpy
  (PCG64 seeded from `key`): nothing is compiled, and the result is the same on every backend
  and process. `shardings` (a matching pytree of jax Shardings) places each leaf as it is made.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
  placements = (jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
                if shardings is not None else [None] * len(leaves))
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  out = []
  for (path, leaf), placement in zip(leaves, placements):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = np.ones(leaf.shape, np.float32)
    else:
      value = rng.standard_normal(leaf.shape, np.float32) * np.float32(cfg.initializer_range)
    value = value.astype(leaf.dtype)
    out.append(jax.device_put(value, placement) if placement is not None else jnp.asarray(value))
  return jax.tree.unflatten(treedef, out)


def logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  """The params pytree with each leaf replaced by its logical axis names (a PartitionSpec)."""
  return nn.get_partition_spec(_abstract_variables(cfg)["params"])


def positions_from_mask(token_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """Positions [B, T]: 0, 1, ... counted over real tokens only (left padding gets position 0)."""
  if token_mask is None:
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
  return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1, 0)


def forward(cfg: ModelConfig, params, tokens: jax.Array, *, token_mask: jax.Array | None = None,
            positions: jax.Array | None = None, cache: DecodeCache | None = None,
            compute_logits: bool = True, return_hidden_states: bool = False) -> ModelOutput:
  """Pure forward pass. tokens int32 [B, T]; token_mask [B, T] bool (False: padding).

  positions default to `positions_from_mask`; with a cache, pass the absolute positions of the new
  tokens. With a cache, tokens are appended at cache.index (prefill: many tokens; decode: one).
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T]; got shape {tokens.shape}")
  if positions is None:
    positions = positions_from_mask(token_mask, tokens.shape)
  out = _module(cfg).apply({"params": params}, tokens, positions, token_mask, cache,
                           compute_logits=compute_logits, return_hidden_states=return_hidden_states)
  return ModelOutput(logits=out.get("logits"), aux_loss=aux_loss(out["router_stats"]),
                     hidden=out["hidden"], router_stats=out["router_stats"],
                     cache=out.get("cache"), hidden_states=out.get("hidden_states"))


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts from shapes alone (jax.eval_shape: nothing is allocated).

  Keys: total; embedding; lm_head; lightning_layers / softmax_layers (attention + norms of each
  kind); moe (all experts + routers); active_per_token (one token's path: attention, norms, the
  router and top-k experts, final norm; excluding embedding and LM head); active_with_lm_head.
  """
  shapes = abstract_params(cfg)
  size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  counts = {"embedding": size(shapes["embed"]), "lm_head": size(shapes["lm_head"]),
            "lightning_layers": 0, "softmax_layers": 0, "moe": 0,
            "final_norm": size(shapes["final_norm"])}
  per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
  active = counts["final_norm"]
  for i in range(cfg.num_hidden_layers):
    layer = shapes[f"layers_{i}"]
    moe = size(layer["moe"])
    rest = size(layer) - moe
    counts["lightning_layers" if cfg.is_lightning[i] else "softmax_layers"] += rest
    counts["moe"] += moe
    active += rest + moe - (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert
  counts["total"] = size(shapes)
  counts["active_per_token"] = active
  counts["active_with_lm_head"] = active + counts["lm_head"]
  return counts
