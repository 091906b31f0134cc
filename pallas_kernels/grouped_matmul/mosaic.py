"""The Mosaic GPU grouped-matmul kernels JAX ships for Hopper, with m1jax's tiling.

jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot computes the forward (rows sorted by
group, one (block_m, block_n) output tile per step of a persistent loop over the SMs, wgmma on
TMA-pipelined K blocks) and, with transpose_rhs, the input gradient;
transposed_ragged_dot_mgpu.transposed_ragged_dot the weight gradient (the ragged axis is the
contraction). Measured on an H200 on the small preset's expert shapes (32768 rows, 1024 x 768 and
768 x 1024, 16 groups): 184-231 TF/s forward and 193-209 TF/s weight gradient against
lax.ragged_dot's 29 and 21 TF/s (docs/benchmarks.md). The tilings below are those measured best
for those shapes; `tiling_*` return None for shapes the kernels cannot take (then the dispatch
uses XLA).

Each entry point is jitted: the model calls the same kernel on the same shapes in every MoE layer
(and again in rematerialised forwards), and a jitted call is traced and lowered once per shape
for the whole program instead of once per call (a Mosaic GPU kernel takes about 0.2-0.4 s to
lower; the small preset's train step had 48 such lowerings of 6 distinct kernels).
"""

from __future__ import annotations

import dataclasses

import jax

BLOCK_K = 64


@dataclasses.dataclass(frozen=True)
class Tiling:
  block_m: int
  block_n: int
  block_k: int
  max_concurrent_steps: int
  grid_block_n: int

  def kwargs(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def forward_tiling(k: int, n: int) -> Tiling | None:
  """Tiling of ragged_dot for contraction k and output width n (None: it does not apply)."""
  if k % BLOCK_K:
    return None
  for block_n, grid_block_n in ((192, 1), (128, 4), (128, 2), (128, 1), (64, 1)):
    if n % (block_n * grid_block_n) == 0:
      return Tiling(128, block_n, BLOCK_K, 4, grid_block_n)
  return None


def weight_grad_tiling(k: int, n: int) -> Tiling | None:
  """Tiling of transposed_ragged_dot producing [G, k, n] (None: it does not apply)."""
  if k % 128 or n % 128:
    return None
  return Tiling(128, 128, BLOCK_K, 4, 2 if (n // 128) % 2 == 0 else 1)


def unmet(lhs_shape, rhs_shape, dtype) -> list[str]:
  """What the Mosaic kernels need that lhs [M, K], rhs [G, K, N] of `dtype` lack ([] if none)."""
  from pallas_kernels.platform import is_hopper  # pylint: disable=g-import-not-at-top
  _, k = lhs_shape
  _, _, n = rhs_shape
  missing = []
  if not is_hopper():
    missing.append("a GPU of compute capability 9.x (Hopper)")
  if jax.numpy.dtype(dtype).itemsize != 2:
    missing.append(f"16-bit operands (got {dtype})")
  if forward_tiling(k, n) is None:
    missing.append(f"K={k} a multiple of {BLOCK_K} and N={n} of 64")
  if forward_tiling(n, k) is None or weight_grad_tiling(k, n) is None:
    missing.append(f"K={k} and N={n} multiples of 128 (the gradients)")
  return missing


@jax.jit
def forward(lhs, rhs, group_sizes):
  """lhs [M, K] @ rhs[g] [K, N] per row group -> [M, N] in lhs.dtype."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=g-import-not-at-top
  tiling = forward_tiling(lhs.shape[1], rhs.shape[2])
  return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, **tiling.kwargs())


@jax.jit
def input_grad(d_out, rhs, group_sizes):
  """d_out [M, N] @ rhs[g]^T per row group -> [M, K] in d_out.dtype."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # pylint: disable=g-import-not-at-top
  tiling = forward_tiling(d_out.shape[1], rhs.shape[1])
  return ragged_dot_mgpu.ragged_dot(d_out, rhs, group_sizes=group_sizes, transpose_rhs=True,
                                    **tiling.kwargs())


@jax.jit
def weight_grad(lhs, d_out, group_sizes):
  """Per group g: lhs[rows of g]^T @ d_out[rows of g] -> [G, K, N] in lhs.dtype."""
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
  tiling = weight_grad_tiling(lhs.shape[1], d_out.shape[1])
  return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, d_out, group_sizes=group_sizes,
                                                          **tiling.kwargs())
