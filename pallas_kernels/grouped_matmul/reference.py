"""Grouped matmul (the MoE's expert GEMMs) in plain XLA: the references.

Rows of `lhs` are sorted by group: group g owns rows [sum(sizes[:g]), sum(sizes[:g + 1])), and
row r of the output is lhs[r] @ rhs[g] for its group g.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_xla(lhs, rhs, group_sizes):
  """lax.ragged_dot with float32 accumulation. lhs [M, K]; rhs [G, K, N]; group_sizes int32 [G]
  (summing to M) -> [M, N] in lhs.dtype."""
  out = jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes,
                           preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)


def grouped_matmul_dense(lhs, rhs, group_sizes):
  """Every row against every group's matrix, masked to its own group (a scan over groups, so
  memory stays O(M N)); tests only. Same signature and float32 accumulation as
  grouped_matmul_xla."""
  ends = jnp.cumsum(group_sizes)
  rows = jnp.arange(lhs.shape[0])

  def add_group(out, g):
    mine = (rows >= ends[g] - group_sizes[g]) & (rows < ends[g])
    product = jnp.dot(lhs, rhs[g].astype(lhs.dtype), preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
    return out + jnp.where(mine[:, None], product, 0.0), None

  out, _ = jax.lax.scan(add_group, jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32),
                        jnp.arange(rhs.shape[0]))
  return out.astype(lhs.dtype)


def input_grad_xla(d_out, rhs, group_sizes):
  """The input gradient: d_out [M, N] @ rhs[g]^T per row group -> [M, K] in d_out.dtype."""
  return grouped_matmul_xla(d_out, jnp.swapaxes(rhs, 1, 2), group_sizes)


def weight_grad_xla(lhs, d_out, group_sizes):
  """The weight gradient: per group g, lhs[rows of g]^T @ d_out[rows of g]. lhs [M, K];
  d_out [M, N] -> [G, K, N] in lhs.dtype (float32 accumulation; 0 for an empty group)."""
  numbers = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[])
  out = jax.lax.ragged_dot_general(lhs, d_out, group_sizes, numbers,
                                   preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)
