"""Top-k Mixture of SwiGLU experts.

Dropless grouped GEMM, capacity-factor dispatch, dense reference.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from m1jax.config import ModelConfig
from m1jax.model import common
from pallas_kernels import grouped_matmul


class RouterStats(NamedTuple):
  """Per-layer sums for the Switch-style aux loss (pooled over layers by the model)."""
  assignments: jax.Array  # [X] f32: top-k assignments per expert (padding excluded)
  probabilities: jax.Array  # [X] f32: sum of router probabilities per expert
  tokens: jax.Array  # [] f32: number of non-padding tokens
  dropped: jax.Array  # [] f32: assignments dropped by the capacity limit


class RoutingReplay(NamedTuple):
  """Experts to route tokens to instead of the router's top-k (MoE routing replay, "R3").

  Rows where `mask` is True use `experts`; their weights are the router's current
  probabilities at those experts, renormalised. The other rows are routed as usual.
  """
  experts: jax.Array  # int [..., L, k] (per layer in model.forward, [N, k] in route)
  mask: jax.Array  # bool [...]: rows (tokens) that replay


def expert_id_dtype(num_experts: int):
  """The smallest unsigned integer dtype holding expert ids 0 .. num_experts - 1."""
  for dtype in (jnp.uint8, jnp.uint16, jnp.uint32):
    if num_experts <= jnp.iinfo(dtype).max + 1:
      return dtype
  raise ValueError(f"num_experts={num_experts}: more than 2^32 experts")


def route(x: jax.Array, router: jax.Array, top_k: int, replay: RoutingReplay | None = None):
  """Router: fp32 logits, softmax over all experts, top-k, renormalised weights.

  x [N, E]; router [E, X]; replay: optional RoutingReplay with experts [N, k] and mask [N]
  -> probs [N, X] f32, weights [N, k] f32, experts [N, k] int32.
  """
  with jax.named_scope("router"):
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if replay is not None:
      experts = jnp.where(replay.mask[:, None], replay.experts.astype(jnp.int32), experts)
      weights = jnp.take_along_axis(probs, experts, axis=-1)
    return probs, weights / jnp.sum(weights, axis=-1, keepdims=True), experts


def _swiglu_grouped(xs, w1, w3, w2, group_sizes, dtype, gemm_impl: str, fuse_rows: int):
  """Grouped SwiGLU on rows sorted by expert: xs [M, E] -> [M, E]. With M >= fuse_rows the gate
  and up projections run as one grouped matmul on [w1 | w3]; else as two, on w1 and w3 as they
  are (no copy of the weights into one array)."""
  inter = w1.shape[-1]
  xs = xs.astype(dtype)
  product = lambda a, w: checkpoint_name(grouped_matmul(a, w, group_sizes, impl=gemm_impl),
                                         common.EXPERT_MATMUL_OUTPUT)
  if xs.shape[0] >= fuse_rows:
    w13 = jnp.concatenate([w1.astype(dtype), w3.astype(dtype)], axis=-1)  # [X, E, 2I]
    gate_up = product(xs, w13)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
  else:
    gate, up = product(xs, w1), product(xs, w3)
  return product(jax.nn.silu(gate) * up, w2)


# The dropless path's row permutations with gathers for gradients: XLA differentiates an indexed
# read into a scatter-add (atomics on a GPU), though each index here is a permutation whose
# inverse is known.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sorted_rows(k, x, order, rank):
  """x [N, E] -> [N * k, E], row i the token of assignment order[i] (assignment = token * k +
  choice); rank is the inverse of order. The gradient sums each token's k rows."""
  del rank
  return x[order // k]


def _sorted_rows_fwd(k, x, order, rank):
  return _sorted_rows(k, x, order, rank), rank


def _sorted_rows_bwd(k, rank, g):
  per_token = g[rank].reshape(-1, k, g.shape[-1])
  return jnp.sum(per_token.astype(jnp.float32), axis=1).astype(g.dtype), None, None


_sorted_rows.defvjp(_sorted_rows_fwd, _sorted_rows_bwd)


@jax.custom_vjp
def _unsorted_rows(y, order, rank):
  """y [N * k, E] in expert order -> assignment order (y[rank]); the gradient is g[order]."""
  del order
  return y[rank]


def _unsorted_rows_fwd(y, order, rank):
  return _unsorted_rows(y, order, rank), order


def _unsorted_rows_bwd(order, g):
  return g[order], None, None


_unsorted_rows.defvjp(_unsorted_rows_fwd, _unsorted_rows_bwd)


def experts_dropless(x, weights, experts, w1, w3, w2, dtype, gemm_impl: str = "auto",
                     fuse_rows: int = 0):
  """Every assignment computed: sort by expert, grouped GEMMs (pallas_kernels.grouped_matmul:
  Mosaic GPU kernels on Hopper, lax.ragged_dot elsewhere), unsort, combine.

  x [N, E]; weights [N, k] f32; experts [N, k] int32; w1/w3 [X, E, I]; w2 [X, I, E] -> [N, E].
  fuse_rows: the gate and up projections are one grouped matmul from N * k >= fuse_rows rows.
  """
  n, k = experts.shape
  with jax.named_scope("dispatch"):
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # sorted row -> assignment (token * k + choice)
    sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    xs = _sorted_rows(k, x, order, rank)
  with jax.named_scope("experts"):
    y = _swiglu_grouped(xs, w1, w3, w2, sizes, dtype, gemm_impl, fuse_rows)
  with jax.named_scope("combine"):
    y = _unsorted_rows(y, order, rank).reshape(n, k, -1)  # back in assignment order
    return jnp.einsum("nke,nk->ne", y.astype(jnp.float32), weights).astype(dtype)


def experts_capacity(x, weights, experts, w1, w3, w2, dtype, capacity_factor: float):
  """GShard-style dispatch with a per-expert capacity; overflowing assignments are dropped.

  capacity = ceil(cf * N * k / X). Priority: all first choices (in token order), then second...
  Returns (out [N, E], number of dropped assignments).
  """
  n, k = experts.shape
  num_experts = w1.shape[0]
  capacity = min(n, max(1, math.ceil(capacity_factor * n * k / num_experts)))
  choice_major = experts.T.reshape(-1)  # [k*N]
  one_hot = jax.nn.one_hot(choice_major, num_experts, dtype=jnp.int32)
  slot = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # position within expert
  kept = slot < capacity
  tokens = jnp.tile(jnp.arange(n), k)
  buffer = jnp.zeros((num_experts, capacity, x.shape[-1]), dtype)
  buffer = buffer.at[choice_major, slot].set(x[tokens].astype(dtype), mode="drop")
  mm = common.matmul
  hidden = (jax.nn.silu(mm("xce,xei->xci", buffer, w1, dtype))
            * mm("xce,xei->xci", buffer, w3, dtype))
  y = mm("xci,xie->xce", hidden, w2, dtype)
  y = jnp.where(kept[:, None], y[choice_major, jnp.minimum(slot, capacity - 1)], 0)
  y = y.reshape(k, n, -1).transpose(1, 0, 2)
  out = jnp.einsum("nke,nk->ne", y.astype(jnp.float32), weights).astype(dtype)
  return out, jnp.sum(~kept).astype(jnp.float32)


def dense_at_decode(cfg: ModelConfig, rows: int) -> bool:
  """Whether a one-token step of `rows` rows runs `experts_dense` (ModelConfig.moe_impl, or
  moe_dense_decode_rows on a GPU)."""
  return cfg.moe_impl == "dense" or (
      rows <= cfg.moe_dense_decode_rows and jax.default_backend() == "gpu"
      and cfg.moe_capacity_factor is None)


def stack_gate_up(w1, w3):
  """[w1, w3] stacked on a new axis before the last: [..., E, I] x 2 -> [..., E, 2, I] (every
  axis keeps its sharding), the operand of experts_dense's one gate-and-up product."""
  return jnp.stack([w1, w3], axis=-2)


def experts_dense(x, weights, experts, w1, w3, w2, dtype, w13=None):
  """Every expert on every token, combined with the (sparse) top-k weights: the reference, and
  the decode steps' path (ModelConfig.moe_dense_decode_rows), where it reads each expert once.

  x [N, E]; weights [N, k] f32; experts [N, k] int32; w1/w3 [X, E, I]; w2 [X, I, E] -> [N, E].
  w13: optional stack_gate_up(w1, w3) [X, E, 2, I], made once per decode call: the gate and up
  projections then run as one product (at B = 256 on an H200, 24% less MoE time than two).
  The expert axis is the batch axis of every product: each expert's matrices are read as stored
  (a shared x against w1 [X, E, I] would make XLA copy a transposed w1 at every step), and
  expert- and tensor-sharded weights need no resharding.
  """
  mm = common.matmul
  xs = jnp.broadcast_to(x.astype(dtype), (w1.shape[0],) + x.shape)  # [X, N, E]
  if w13 is None:
    hidden = jax.nn.silu(mm("xne,xei->xni", xs, w1, dtype)) * mm("xne,xei->xni", xs, w3, dtype)
  else:
    gate_up = mm("xne,xeci->xnci", xs, w13, dtype)  # [X, N, 2, I]
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
  y = mm("xni,xie->xne", hidden, w2, dtype)
  combine = jnp.sum(jax.nn.one_hot(experts, w1.shape[0]) * weights[..., None], axis=1)  # [N, X]
  return jnp.einsum("xne,nx->ne", y.astype(jnp.float32), combine).astype(dtype)


class MoE(nn.Module):
  """Sparse MoE block: router [E, X], experts w1/w3 [X, E, I] (gate/up) and w2 [X, I, E] (down)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array, token_mask: jax.Array | None = None,
               replay: RoutingReplay | None = None):
    """h [B, T, E]; token_mask [B, T] bool; replay: optional RoutingReplay with experts
    [B, T, k] and mask [B, T] -> (out [B, T, E], RouterStats, experts [B, T, k] int32: the
    experts each token was routed to)."""
    cfg = self.cfg
    e, i, nx = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    dtype, pdtype, std = cfg.jnp_dtype, cfg.jnp_param_dtype, cfg.initializer_range
    router = common.param(self, "router", (e, nx), ("embed", None), std, pdtype)
    w1 = common.param(self, "w1", (nx, e, i), ("expert", "embed", "mlp"), std, pdtype)
    w3 = common.param(self, "w3", (nx, e, i), ("expert", "embed", "mlp"), std, pdtype)
    w2 = common.param(self, "w2", (nx, i, e), ("expert", "mlp", "embed"), std, pdtype)

    b, t, _ = h.shape
    x = h.reshape(b * t, e)
    if replay is not None:
      replay = RoutingReplay(replay.experts.reshape(b * t, -1), replay.mask.reshape(b * t))
    probs, weights, experts = route(x, router, cfg.num_experts_per_tok, replay)
    dropped = jnp.zeros((), jnp.float32)
    if cfg.moe_impl == "dense" or (t == 1 and dense_at_decode(cfg, b)):
      # w13: stack_gate_up(w1, w3), where the decode loop's params carry it (fuse_gate_up)
      w13 = self.get_variable("params", "w13") if self.has_variable("params", "w13") else None
      out = experts_dense(x, weights, experts, w1, w3, w2, dtype, w13)
    elif cfg.moe_capacity_factor is not None:
      out, dropped = experts_capacity(x, weights, experts, w1, w3, w2, dtype,
                                      cfg.moe_capacity_factor)
    else:
      out = experts_dropless(x, weights, experts, w1, w3, w2, dtype, cfg.moe_gemm_impl,
                             cfg.moe_fuse_gate_up_rows)

    valid = (jnp.ones((b * t,), jnp.float32) if token_mask is None
             else token_mask.reshape(-1).astype(jnp.float32))
    assignments = jnp.einsum("nkx,n->x", jax.nn.one_hot(experts, nx, dtype=jnp.float32), valid)
    stats = RouterStats(assignments, jnp.einsum("nx,n->x", probs, valid), jnp.sum(valid), dropped)
    return out.reshape(b, t, e), stats, experts.reshape(b, t, -1)


def aux_loss(stats: RouterStats) -> jax.Array:
  """Switch-style load-balancing loss pooled over layers, as transformers computes it.

  stats fields stacked over layers ([L, X] / [L]): E * sum_e f_e * P_e with f_e the fraction of
  top-k assignments and P_e the mean router probability, both over all layers' tokens.
  """
  rows = jnp.maximum(jnp.sum(stats.tokens), 1.0)
  fraction = jnp.sum(stats.assignments, axis=0) / rows
  mean_prob = jnp.sum(stats.probabilities, axis=0) / rows
  return stats.assignments.shape[-1] * jnp.sum(fraction * mean_prob)
