"""The one entry point of the grouped matmul: Mosaic GPU kernels on Hopper, XLA elsewhere.

    out = grouped_matmul(lhs, rhs, group_sizes, impl="auto")   # lhs [M, K], rhs [G, K, N]

Rows of lhs are sorted by group (group g owns the next group_sizes[g] rows; the sizes sum to
M); row r of the output is lhs[r] @ rhs[g] with float32 accumulation, in lhs.dtype.
Differentiable in lhs and rhs: on the Mosaic path a custom_vjp runs the input gradient and the
weight gradient on Mosaic GPU kernels too. The Mosaic path lays the rows out so that every group
starts at a multiple of the kernels' row tile (128): measured on an H200, JAX's forward kernel
is wrong (3% relative error) when one tile holds rows of several small groups (decode-sized
batches); aligned, no tile holds two groups, at the cost of up to G x 128 zero rows.

impl: "auto" (Mosaic where it applies: a Hopper GPU, 16-bit operands, shapes the kernels' tilings
take; XLA's lax.ragged_dot otherwise), "mosaic" (or an error naming what is missing) or "xla".
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul import mosaic, reference

IMPLEMENTATIONS = ("auto", "mosaic", "xla")


class Kernels(NamedTuple):
  """The three products of a grouped matmul and its gradient (mosaic.py's signatures)."""
  forward: Callable  # (lhs [M, K], rhs [G, K, N], sizes) -> [M, N]
  input_grad: Callable  # (d_out [M, N], rhs [G, K, N], sizes) -> [M, K]
  weight_grad: Callable  # (lhs [M, K], d_out [M, N], sizes) -> [G, K, N]


MOSAIC_KERNELS = Kernels(mosaic.forward, mosaic.input_grad, mosaic.weight_grad)
XLA_KERNELS = Kernels(reference.grouped_matmul_xla, reference.input_grad_xla,
                      reference.weight_grad_xla)


def resolve_impl(impl: str, lhs_shape, rhs_shape, dtype) -> str:
  """The implementation `impl` means for these operands ("auto" -> "mosaic" or "xla")."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"grouped matmul implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
  if impl == "xla":
    return impl
  missing = mosaic.unmet(lhs_shape, rhs_shape, dtype)
  if impl == "mosaic" and missing:
    raise ValueError("grouped matmul impl='mosaic' needs " + ", ".join(missing))
  return "xla" if missing else "mosaic"


def aligned_rows(group_sizes, rows: int, block: int):
  """Where each row goes when every group starts at a multiple of `block`: (padded group sizes
  [G] (multiples of block), destination row [rows] in a layout of rows + G * block rows)."""
  padded = (group_sizes + block - 1) // block * block
  ends = jnp.cumsum(group_sizes)
  group = jnp.minimum(jnp.searchsorted(ends, jnp.arange(rows), side="right"),
                      group_sizes.shape[0] - 1)
  shift = (jnp.cumsum(padded) - padded) - (ends - group_sizes)  # padded start - start
  return padded, jnp.arange(rows) + shift[group]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul_custom_vjp(lhs, rhs, group_sizes, kernels: Kernels, block: int):
  """A grouped matmul whose forward and two gradients are `kernels` (same dtype operands),
  run on a copy of the rows in which every group starts at a multiple of `block` (no tile of
  the kernels holds rows of two groups; the rows between groups are zeros)."""
  return _fwd(lhs, rhs, group_sizes, kernels, block)[0]


def _spread(x, source):
  """x [M, W] laid out as `source` says ([M_pad] row of x, or M for a zero row): a gather."""
  return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[source]


def _fwd(lhs, rhs, group_sizes, kernels, block):
  rows = lhs.shape[0]
  padded, dest = aligned_rows(group_sizes, rows, block)
  # Room for every group's start rounded up, as a whole number of tiles (the kernels' TMA
  # copies take no partial tile: 2 rows + 16 x 128 would be rejected).
  layout_rows = -(-(rows + group_sizes.shape[0] * block) // block) * block
  source = jnp.full((layout_rows,), rows, jnp.int32).at[dest].set(
      jnp.arange(rows, dtype=jnp.int32))
  lhs_p = _spread(lhs, source)
  out = kernels.forward(lhs_p, rhs, padded)[dest]  # rows of no group are never read
  return out, (lhs_p, rhs, padded, dest, source)


def _bwd(kernels, block, residuals, d_out):
  del block
  lhs_p, rhs, padded, dest, source = residuals
  d_out_p = _spread(d_out.astype(lhs_p.dtype), source)
  d_lhs = kernels.input_grad(d_out_p, rhs, padded)[dest]
  d_rhs = kernels.weight_grad(lhs_p, d_out_p, padded)
  return d_lhs, d_rhs.astype(rhs.dtype), np.zeros(padded.shape, jax.dtypes.float0)


grouped_matmul_custom_vjp.defvjp(_fwd, _bwd)


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto"):
  """lhs [M, K] (rows sorted by group); rhs [G, K, N]; group_sizes int32 [G] summing to M ->
  [M, N] in lhs.dtype, float32 accumulation. rhs is cast to lhs.dtype first."""
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"grouped matmul needs lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and "
                     f"{rhs.shape}")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"group_sizes must be [G]=[{rhs.shape[0]}]; got {group_sizes.shape}")
  rhs = rhs.astype(lhs.dtype)
  group_sizes = group_sizes.astype(np.int32)
  if resolve_impl(impl, lhs.shape, rhs.shape, lhs.dtype) == "xla":
    return reference.grouped_matmul_xla(lhs, rhs, group_sizes)
  block = mosaic.forward_tiling(lhs.shape[1], rhs.shape[2]).block_m
  return grouped_matmul_custom_vjp(lhs, rhs, group_sizes, MOSAIC_KERNELS, block)
