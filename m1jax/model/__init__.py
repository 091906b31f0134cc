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

from m1jax import sharding as sharding_lib
from m1jax.config import ModelConfig
from m1jax.model import moe as moe_lib
from m1jax.model.moe import (RouterStats, RoutingReplay, aux_loss, dense_at_decode,
                             expert_id_dtype)
from m1jax.model.transformer import (DecodeCache, Transformer, init_cache, lm_head_logits,
                                     unstack_cache)

__all__ = ["ModelOutput", "DecodeCache", "RoutingReplay", "init", "abstract_params",
           "unstack_layer_groups", "unstack_cache", "fuse_gate_up", "dense_at_decode",
           "compute_params", "forward", "init_cache", "layer_params", "logical_axes",
           "param_counts", "lm_head_logits", "positions_from_mask", "expert_id_dtype"]


class ModelOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, V] in cfg.lm_head_dtype (None when compute_logits=False)
  # [] MoE load-balancing loss (unscaled; times router_aux_loss_coef in training)
  aux_loss: jax.Array
  hidden: jax.Array  # [B, T, E] final-normed hidden states
  router_stats: RouterStats  # fields stacked over layers
  cache: DecodeCache | None  # updated cache when one was passed
  hidden_states: tuple[jax.Array, ...] | None  # per-layer outputs [B, T, E] when requested
  # int32 [B, T, L, k]: the experts each token was routed to in each layer, when requested
  routed_experts: jax.Array | None = None


def _module(cfg: ModelConfig) -> Transformer:
  return Transformer(cfg)


def _abstract_variables(cfg: ModelConfig):
  """The variables' shapes, from tracing the module's init on one token. The trace takes the
  jnp lightning path: the kernels' choices (e.g. lightning_kernel.forward_impl="mosaic", which
  needs T a multiple of 64) do not shape the params and must not refuse the 1-token probe."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  module = _module(cfg.replace(lightning_impl="blockwise"))
  return jax.eval_shape(
      lambda t: module.init(jax.random.key(0), t, jnp.zeros((1, 1), jnp.int32),
                            compute_logits=False), tokens)


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
  """The params pytree as jax.ShapeDtypeStructs (nothing is allocated)."""
  return nn.meta.unbox(_abstract_variables(cfg)["params"])


def _canonical_leaves(cfg: ModelConfig, shapes) -> list[tuple[tuple[str, ...], Any, tuple]]:
  """(per-layer path, leaf of `shapes`, row index) of every parameter tensor of one layer or of
  the embedding, norms and LM head. Layer l's tensors are named as if unstacked, `layers_{l}/...`,
  and sit at row l // p of the stacked leaf params["layers"][f"layer_{l % p}"]/..."""
  period = cfg.layer_period
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    if keys[0] != "layers":
      out.append((keys, leaf, ()))
      continue
    j = int(keys[1].removeprefix("layer_"))
    for group in range(cfg.num_layer_groups):
      out.append(((f"layers_{group * period + j}",) + keys[2:], leaf, (group,)))
  return out


def _draw(cfg: ModelConfig, rng: np.random.Generator, name: tuple[str, ...], shape, dtype):
  """One tensor of the init stream: ones for norm scales (no draws), else normal * range."""
  if name[-1] == "scale":
    return np.ones(shape, dtype)
  value = rng.standard_normal(shape, np.float32)
  value *= np.float32(cfg.initializer_range)
  return value.astype(dtype, copy=False)


def init(cfg: ModelConfig, key: jax.Array, shardings=None) -> dict[str, Any]:
  """Random parameters as a plain pytree: normal(0, initializer_range) matrices, ones for norms.

  Shapes come from the modules (`abstract_params(cfg)`: the pytree of jax.ShapeDtypeStructs,
  nothing allocated; `jax.eval_shape(model.init, ...)` does not work, since init draws on the
  host). The numbers are drawn on the host with numpy from one PCG64 stream seeded from `key`,
  tensor by tensor in the sorted order of their per-layer names (`layers_{l}/attn/qkv`, ...):
  nothing is compiled, the result is the same on every backend and process, and a layer's values
  do not depend on how the layers are grouped for the scan.

  `shardings` (a matching pytree of jax Shardings): each process builds only the blocks its own
  devices hold, with the same values as without shardings. The stream is sequential (normal
  draws use rejection sampling, so a position in it cannot be computed), so every process first
  runs through the whole stream once, recording where each tensor starts; then, leaf by leaf, it
  re-draws the tensors of that leaf (one per layer row), copies their local parts into the
  leaf's local blocks and places those on the devices. Host memory: one leaf's local blocks plus
  one tensor (instead of the whole model); time: two passes over the stream.
  """
  shapes = abstract_params(cfg)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  order = sorted(_canonical_leaves(cfg, shapes), key=lambda item: item[0])
  if shardings is None:
    values = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), shapes)
    slots = {id(leaf): array for leaf, array in zip(jax.tree.leaves(shapes),
                                                    jax.tree.leaves(values))}
    for name, leaf, row in order:
      slots[id(leaf)][row] = _draw(cfg, rng, name, leaf.shape[len(row):], leaf.dtype)
    return jax.tree.map(jnp.asarray, values)

  starts: dict[int, list[tuple[tuple[str, ...], tuple, dict]]] = {}  # leaf -> (name, row, state)
  for name, leaf, row in order:
    starts.setdefault(id(leaf), []).append((name, row, rng.bit_generator.state))
    _draw(cfg, rng, name, leaf.shape[len(row):], leaf.dtype)

  def build(leaf, leaf_sharding):
    blocks = {box: np.empty(sharding_lib.box_shape(box), leaf.dtype)
              for box in sharding_lib.local_blocks(leaf_sharding, leaf.shape)}
    for name, row, state in starts[id(leaf)]:
      rng.bit_generator.state = state
      value = _draw(cfg, rng, name, leaf.shape[len(row):], leaf.dtype)
      for box, block in blocks.items():
        lead, rest = box[:len(row)], box[len(row):]
        if all(start <= r < stop for r, (start, stop) in zip(row, lead)):
          at = tuple(r - start for r, (start, _) in zip(row, lead))
          block[at] = value[tuple(slice(start, stop) for start, stop in rest)]
      del value
    return sharding_lib.array_from_blocks(leaf.shape, leaf.dtype, leaf_sharding, blocks.items())

  return jax.tree.map(build, shapes, shardings)


def compute_params(cfg: ModelConfig, params) -> dict[str, Any]:
  """params cast once to the dtype the forward uses each in: cfg.dtype for the embedding, the
  weights and the norm scales, cfg.lm_head_dtype for the LM head; the MoE routers stay as they
  are (routing is float32). The forward casts each use anyway, so forward(compute_params(p))
  equals forward(p) bit for bit; a decode loop given them reads 16-bit weights at every step."""
  def cast(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if names[-1] == "router":
      return leaf
    return leaf.astype(cfg.jnp_lm_head_dtype if names[-1] == "lm_head" else cfg.jnp_dtype)
  with jax.named_scope("compute_params"):
    return jax.tree_util.tree_map_with_path(cast, params)


def layer_params(cfg: ModelConfig, params, layer: int) -> dict[str, Any]:
  """The parameters of decoder layer `layer` (global index), unstacked from params["layers"]."""
  if not 0 <= layer < cfg.num_hidden_layers:
    raise ValueError(f"layer={layer}: the model has {cfg.num_hidden_layers} layers")
  group, j = divmod(layer, cfg.layer_period)
  if "layers" not in params:  # unstack_layer_groups
    return params[f"layers_{group}"][f"layer_{j}"]
  return jax.tree.map(lambda x: x[group], params["layers"][f"layer_{j}"])


def unstack_layer_groups(cfg: ModelConfig, params) -> dict[str, Any]:
  """params with params["layers"] (leaves [G, ...], G = cfg.num_layer_groups) split into
  params["layers_0"] ... params["layers_{G-1}"]; `forward` takes either form, with equal results.

  For loops around a forward whose layer scan is unrolled anyway (cfg.layer_scan_unroll >= G,
  as in decoding): inside a while loop XLA copies each group's rows out of the stacked weights
  at every iteration; split once before the loop, each group reads its own arrays in place.
  """
  if "layers" not in params:
    raise ValueError("params have no 'layers' (already unstacked?)")
  out = {k: v for k, v in params.items() if k != "layers"}
  for g in range(cfg.num_layer_groups):
    out[f"layers_{g}"] = jax.tree.map(lambda x, g=g: x[g], params["layers"])
  return out


def fuse_gate_up(params) -> dict[str, Any]:
  """params with every MoE's `w13` = moe.stack_gate_up(w1, w3) [..., X, E, 2, I] added next to
  w1 and w3, which stay (prefill's grouped GEMMs read them). A forward given them runs the
  gate and up projections of `experts_dense` as one product; the result equals that of w1 and
  w3 apart (the same dot products). For decode loops: made once per call, not per step."""
  def add(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: add(v) for k, v in tree.items()}
    if {"router", "w1", "w2", "w3"} <= tree.keys():
      out["w13"] = moe_lib.stack_gate_up(tree["w1"], tree["w3"])
    return out
  with jax.named_scope("fuse_gate_up"):
    return add(dict(params))


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
            compute_logits: bool = True, return_hidden_states: bool = False,
            fresh_cache: bool = False, return_experts: bool = False,
            routing_replay: RoutingReplay | None = None) -> ModelOutput:
  """Pure forward pass. tokens int32 [B, T]; token_mask [B, T] bool (False: padding).

  positions default to `positions_from_mask`; with a cache, pass the absolute positions of the new
  tokens. With a cache, tokens are appended at cache.index (prefill: many tokens; decode: one);
  fresh_cache=True says the cache is empty (a prefill at index 0), so the softmax layers attend
  over the new tokens only (flash attention on GPU) instead of over the cache's slots.
  return_experts: also return `routed_experts` [B, T, L, k]. routing_replay: RoutingReplay with
  experts int [B, T, L, k] and mask bool [B, T]: the tokens in the mask are routed to those
  experts in every layer (weights from the current router at those experts, renormalised), the
  others as usual; gradients reach the router through the weights.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T]; got shape {tokens.shape}")
  if positions is None:
    positions = positions_from_mask(token_mask, tokens.shape)
  if routing_replay is not None:
    layers, top_k = cfg.num_hidden_layers, cfg.num_experts_per_tok
    if (routing_replay.experts.shape != tokens.shape + (layers, top_k)
        or routing_replay.mask.shape != tokens.shape):
      raise ValueError(f"routing_replay: experts {routing_replay.experts.shape} and mask "
                       f"{routing_replay.mask.shape} must be {tokens.shape + (layers, top_k)} "
                       f"and {tokens.shape} ([B, T, L, k] and [B, T])")
  out = _module(cfg).apply({"params": params}, tokens, positions, token_mask, cache,
                           compute_logits=compute_logits, return_hidden_states=return_hidden_states,
                           fresh_cache=fresh_cache, return_experts=return_experts,
                           routing_replay=routing_replay,
                           unstacked_groups="layers" not in params)
  return ModelOutput(logits=out.get("logits"), aux_loss=aux_loss(out["router_stats"]),
                     hidden=out["hidden"], router_stats=out["router_stats"],
                     cache=out.get("cache"), hidden_states=out.get("hidden_states"),
                     routed_experts=out.get("routed_experts"))


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
  groups = cfg.num_layer_groups
  for j, is_lightning in enumerate(cfg.is_lightning[:cfg.layer_period]):
    layer = shapes["layers"][f"layer_{j}"]
    moe = size(layer["moe"]) // groups
    rest = size(layer) // groups - moe
    counts["lightning_layers" if is_lightning else "softmax_layers"] += groups * rest
    counts["moe"] += groups * moe
    active += groups * (rest + moe - (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert)
  counts["total"] = size(shapes)
  counts["active_per_token"] = active
  counts["active_with_lm_head"] = active + counts["lm_head"]
  return counts
