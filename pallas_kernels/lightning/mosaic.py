"""Lightning attention sweeps and segment states as Mosaic GPU Pallas kernels (Hopper only).

Per head with decay lambda = exp(-slope), one kernel evaluates the decayed linear recurrence of
`pallas_kernels.lightning.kernel` over a, b, c [T, D] in either direction:

    forward:  X_t = lambda X_{t-1} + b_t^T c_t,  out_t = a_t X_t,  X_{-1} = start, returns X_{T-1};
    reverse:  G_t = lambda G_{t+1} + b_t^T c_t,  out_t = a_t G_t,  lambda G_T = start,
              returns lambda G_0.

The forward with (a, b, c) = (q, k, v) is lightning attention (S_t = X_t); the backward is one
forward and two reverse sweeps (kernel.py's module docstring). Blockwise with C tokens per block
(i, j positions inside the block, Y the carried state):

    forward:  out_blk = [(A B^T) * M] C_blk + (A * lambda^(i+1)) Y,  M[i, j] = lambda^(i-j), i >= j,
              Y_new = lambda^C Y + B^T (C_blk * lambda^(C-1-j));
    reverse:  blocks last to first, M[i, j] = lambda^(j-i) for j >= i, A * lambda^(C-1-i),
              C_blk * lambda^(j+1) (Y = lambda G at the block's end).

This path needs a GPU with compute capability 9.0 (H100, H200): it lowers through Mosaic GPU
(TMA copies, mbarriers, wgmma), not Triton, and has no interpreter (jax 0.10's Mosaic GPU
simulator lacks `plgpu.load` and `pl.run_state`). `pallas_kernels.lightning_attention` runs it on
Hopper and keeps the Triton kernels everywhere else. Long sequences with few (batch, head)
pairs are cut into segments, run as independent sequences; their start states come from the
second kernel here, `lightning_local_states_mosaic` (each part's state from a zero start, a
matmul-like reduction). The sweep's structure follows jax's FlashAttention-3
(jax/experimental/pallas/ops/gpu/attention_mgpu.py).

Design:
  * One CTA per (batch, head) sweeps all blocks of the sequence; there is no sequence split,
    so few (batch, head) pairs leave most SMs idle.
  * Warpgroups: `W = D // 64` compute warpgroups, each owning 64 value columns (W = 2 at
    D = 128, 1 at D = 64), and one memory warpgroup that TMA-loads q, k (full width) and
    each compute warpgroup's slice of v into `num_stages` SMEM slots, running ahead of the
    compute behind per-slot "loaded" and "consumed" barriers.
  * Per block, a compute warpgroup issues four wgmmas: Q K^T [C, C], Q X [C, 64] (X as a
    bf16 copy in SMEM), P V [C, 64] with the masked scores P in registers, and
    K^T (V * decay) [D, 64] accumulated onto lambda^C X. The float32 state X [D, 64] lives in
    registers (wgmma accumulator layout) for the whole sweep; its bf16 copy and the decayed
    v slice are rewritten in SMEM each block. o leaves through SMEM and a TMA store.
  * Per-head decay vectors (forward lambda^(i+1), -slope i, slope j, lambda^(C-1-j), lambda^C;
    reverse their mirror images) are computed by XLA and TMA-loaded once; the intra-block mask
    is exp(min(-slope (i - j), 0)) on i >= j (reverse: exp(min(-slope (j - i), 0)) on j >= i),
    so no power of lambda can overflow.
  * The initial and final states move between registers and HBM directly (no SMEM staging).

SMEM at D = 128, C = 64: 48 KiB per stage (q, k, v) + 64 KiB (state copies, decayed v, o);
at C = 128 only one stage fits (`smem_bytes`; 2 stages would need 293 KiB of the 227 KiB).
"""

from __future__ import annotations

import functools
import inspect

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

_F32 = jnp.float32
_BF16 = jnp.bfloat16
_VALUE_TILE = 64  # value columns per compute warpgroup (wgmma N; one 128-byte swizzle row)
_NUM_VECS = 5  # rows of the per-head decay table
_SMEM_LIMIT = 227 * 1024  # shared memory per block on compute capability 9.0 (opt-in maximum)

# jax 0.10 requires the index argument of plgpu.load; jax 0.11 deprecates passing it.
_LOAD_TAKES_INDEX = (
    inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty)


def _load(ref, layout):
  """Whole `ref` into registers with `layout` (any SMEM/GMEM ref, unvectorized if needed)."""
  if _LOAD_TAKES_INDEX:
    return plgpu.load(ref, (), layout=layout, optimized=False)
  return plgpu.load(ref, layout=layout, optimized=False)


# SMEM layout of every bf16 tile the kernels feed to wgmma: 64-column tiles, 128-byte swizzle.
_SWIZZLED = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _issue_ahead(issue, stages: int, num_blocks: int, consumed_bar):
  """The memory warpgroup's loop: `issue(n, slot)` TMA-loads block n; the first `stages` blocks
  fill the slots, each later one waits until the compute warpgroups consumed its slot."""
  for n in range(stages):
    issue(n, n)

  if num_blocks > stages:
    @pl.loop(stages, num_blocks)
    def _(n):
      slot = lax.rem(n, stages)
      plgpu.barrier_wait(consumed_bar.at[slot])
      issue(n, slot)


def _decay_table(slope, block: int, dim: int, reverse: bool):
  """Per-head vectors [H, 5, max(C, D)] float32 (rows zero-padded to the common length).

  Rows (length C): the decay of a's rows onto the carried state, the row and column terms of the
  intra-block log-decay, the decay of c's rows into the new state; then lambda^C (length D).
  Forward: lambda^(i+1), -slope i, slope j, lambda^(C-1-j); reverse: lambda^(C-1-i), slope i,
  -slope j, lambda^(j+1).
  """
  width = max(block, dim)
  a = slope.astype(_F32)[:, None]
  pos = jnp.arange(block, dtype=_F32)[None, :]
  near, far = jnp.exp(-a * (pos + 1)), jnp.exp(-a * (block - 1 - pos))
  if reverse:
    rows = [far, a * pos, -a * pos, near]
  else:
    rows = [near, -a * pos, a * pos, far]
  rows = [jnp.pad(r, ((0, 0), (0, width - block))) for r in rows]
  rows.append(jnp.broadcast_to(jnp.exp(-a * block), (a.shape[0], dim)))
  rows[-1] = jnp.pad(rows[-1], ((0, 0), (0, width - dim)))
  return jnp.stack(rows, axis=1)


def smem_bytes(block: int, dim: int, stages: int) -> int:
  """Shared memory of one CTA of `_sweep`: `stages` slots of q, k and v blocks, the state's bf16
  copy, the decayed v and the o staging per compute warpgroup, the decay table, the barriers."""
  num_wg = dim // _VALUE_TILE
  per_stage = (2 * block * dim + num_wg * block * _VALUE_TILE) * 2
  fixed = num_wg * (dim * _VALUE_TILE + 2 * block * _VALUE_TILE) * 2
  table = num_wg * _NUM_VECS * max(block, dim) * 4
  barriers = (3 * stages + stages * num_wg + num_wg) * 8
  return stages * per_stage + fixed + table + barriers


def _sweep(q, k, v, table, x0, *, block: int, num_stages: int, reverse: bool):
  """q, k, v (the sweep's a, b, c) [B, T, H, D] bf16; table [H, 5, L] f32; x0 [B, H, D, D] f32
  -> (out [B, T, H, D] bf16, final state [B, H, D, D] f32)."""
  batch, seq_len, heads, dim = q.shape
  width = table.shape[-1]
  vt = _VALUE_TILE
  num_wg = dim // vt  # compute warpgroups
  num_blocks = seq_len // block
  stages = min(num_stages, num_blocks)
  # The n-th block of the sweep (last to first in reverse); n is a Python or a traced int.
  block_of = (lambda n: num_blocks - 1 - n) if reverse else (lambda n: n)
  wgmma_layout = plgpu.Layout.WGMMA
  rows_layout = plgpu.Layout.WGMMA.reduce(1)  # a [M] vector broadcast along dimension 1
  cols_layout = plgpu.Layout.WGMMA.reduce(0)  # an [N] vector broadcast along dimension 0

  def kernel(q_ref, k_ref, v_ref, table_ref, x0_ref, o_ref, x_end_ref, scoped):
    (q_smem, k_smem, v_smem, xs_smem, vd_smem, o_smem, table_smem), barriers = scoped
    q_bar, k_bar, v_bar, consumed_bar, table_bar = barriers
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")

    @pl.when(wg < num_wg)
    def _compute():
      if num_wg == 2:
        plgpu.set_max_registers(232, action="increase")
      cols = pl.ds(wg * vt, vt)
      plgpu.copy_gmem_to_smem(table_ref.at[h], table_smem.at[wg], table_bar.at[wg])
      x = _load(x0_ref.at[b, h, :, cols], wgmma_layout)  # [D, vt] f32
      xs_smem.at[wg][...] = x.astype(_BF16)
      plgpu.barrier_wait(table_bar.at[wg])
      vecs = table_smem.at[wg]
      row_decay = _load(vecs.at[0, pl.ds(0, block)], rows_layout)  # lambda^(i+1) (forward)
      row_log = _load(vecs.at[1, pl.ds(0, block)], rows_layout)  # -slope * i
      col_log = _load(vecs.at[2, pl.ds(0, block)], cols_layout)  # slope * j
      key_decay = _load(vecs.at[3, pl.ds(0, block)], rows_layout)  # lambda^(C-1-j)
      block_decay = _load(vecs.at[4, pl.ds(0, dim)], rows_layout)  # lambda^C
      plgpu.commit_smem()

      def body(n, x):
        slot = lax.rem(n, stages)
        plgpu.barrier_wait(v_bar.at[slot * num_wg + wg])
        v_tile = plgpu.layout_cast(v_smem.at[slot, wg][...], wgmma_layout)  # [C, vt]
        decayed = v_tile.astype(_F32) * lax.broadcast_in_dim(key_decay, (block, vt), [0])
        vd_smem.at[wg][...] = decayed.astype(_BF16)
        plgpu.commit_smem()
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(k_bar.at[slot])

        def scores_and_query_state(s_acc, qx_acc):
          plgpu.wgmma(s_acc, q_smem.at[slot], k_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(qx_acc, q_smem.at[slot], xs_smem.at[wg])
          return s_acc[...], qx_acc[...]

        s, qx = pl.run_scoped(scores_and_query_state, plgpu.ACC((block, block), _F32),
                              plgpu.ACC((block, vt), _F32))
        i = plgpu.broadcasted_iota(jnp.int32, (block, block), 0, layout=wgmma_layout)
        j = plgpu.broadcasted_iota(jnp.int32, (block, block), 1, layout=wgmma_layout)
        gap_log = (lax.broadcast_in_dim(row_log, (block, block), [0])
                   + lax.broadcast_in_dim(col_log, (block, block), [1]))
        mask = jnp.where(j >= i if reverse else i >= j, jnp.exp(jnp.minimum(gap_log, 0.0)), 0.0)
        p = (s * mask).astype(_BF16)
        o_init = qx * lax.broadcast_in_dim(row_decay, (block, vt), [0])
        x_init = x * lax.broadcast_in_dim(block_decay, (dim, vt), [0])

        def values_and_state(refs):
          o_acc, x_acc = refs
          plgpu.wgmma(o_acc, p, v_smem.at[slot, wg])
          plgpu.wgmma(x_acc, k_smem.at[slot].transpose((1, 0)), vd_smem.at[wg])

        o, x = pl.run_state(values_and_state)((plgpu.ACC.init(o_init), plgpu.ACC.init(x_init)))
        plgpu.barrier_arrive(consumed_bar.at[slot])
        xs_smem.at[wg][...] = x.astype(_BF16)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous block's o left o_smem
        o_smem.at[wg][...] = o.astype(_BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg],
                                o_ref.at[b, pl.ds(block_of(n) * block, block), h, cols])
        return x

      x = lax.fori_loop(0, num_blocks, body, x)
      x_end_ref.at[b, h, :, cols][...] = x
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == num_wg)
    def _memory():
      if num_wg == 2:
        plgpu.set_max_registers(40, action="decrease")

      def issue(n, slot):
        rows = pl.ds(block_of(n) * block, block)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h], k_smem.at[slot], k_bar.at[slot])
        for w in range(num_wg):
          plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, pl.ds(w * vt, vt)], v_smem.at[slot, w],
                                  v_bar.at[slot * num_wg + w])

      _issue_ahead(issue, stages, num_blocks, consumed_bar)

  def entry(q_ref, k_ref, v_ref, table_ref, x0_ref, o_ref, x_end_ref):
    tiled = _SWIZZLED
    smem = (
        plgpu.SMEM((stages, block, dim), _BF16, **tiled),  # q
        plgpu.SMEM((stages, block, dim), _BF16, **tiled),  # k
        plgpu.SMEM((stages, num_wg, block, vt), _BF16, **tiled),  # v, one slice per warpgroup
        plgpu.SMEM((num_wg, dim, vt), _BF16, **tiled),  # bf16 copy of the state
        plgpu.SMEM((num_wg, block, vt), _BF16, **tiled),  # v * lambda^(C-1-j)
        plgpu.SMEM((num_wg, block, vt), _BF16, **tiled),  # o staging
        plgpu.SMEM((num_wg, _NUM_VECS, width), _F32),  # decay table
    )
    barriers = (
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages * num_wg),
        plgpu.Barrier(num_arrivals=num_wg, num_barriers=stages),
        plgpu.Barrier(num_barriers=num_wg),
    )
    pl.run_scoped(
        lambda *scoped: kernel(q_ref, k_ref, v_ref, table_ref, x0_ref, o_ref, x_end_ref,
                               scoped),
        smem, barriers, collective_axes="wg")

  return plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, _BF16),
                jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32)),
      grid=(heads, batch),
      grid_names=("heads", "batch"),
      num_threads=num_wg + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, table, x0)


def _check_operands(arrays: dict, block_size: int, num_stages: int):
  """Raises ValueError unless the named arrays are bfloat16 [B, T, H, D] of one shape with D in
  {64, 128}, block_size in {64, 128} and num_stages >= 1."""
  names, shapes = ", ".join(arrays), [x.shape for x in arrays.values()]
  if len(shapes[0]) != 4 or any(shape != shapes[0] for shape in shapes):
    raise ValueError(f"{names} must all be [B, T, H, D]; got " + ", ".join(map(str, shapes)))
  if any(jnp.dtype(x.dtype) != jnp.dtype(_BF16) for x in arrays.values()):
    raise ValueError(f"{names} must be bfloat16; got "
                     + ", ".join(str(x.dtype) for x in arrays.values()))
  if shapes[0][-1] not in (64, 128):
    raise ValueError(f"head dim D must be 64 or 128; got {shapes[0][-1]}")
  if block_size not in (64, 128):
    raise ValueError(f"block_size must be 64 or 128; got {block_size}")
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1; got {num_stages}")


def _check_smem(bytes_of, block: int, dim: int, stages: int):
  """Raises ValueError, naming the most stages that fit, when `bytes_of(block, dim, stages)`
  (a kernel's shared memory per CTA) exceeds a Hopper CTA's."""
  needed = bytes_of(block, dim, stages)
  if needed > _SMEM_LIMIT:
    fits = next((n for n in range(stages - 1, 0, -1) if bytes_of(block, dim, n) <= _SMEM_LIMIT),
                None)
    hint = f"num_stages={fits}" if fits else "a smaller block_size"
    raise ValueError(f"block_size={block} at D={dim} with {stages} stages needs {needed} "
                     f"bytes of shared memory, over the {_SMEM_LIMIT} of a Hopper CTA; use {hint}")


def _state_table(slope, block: int):
  """Per-head vectors [H, 3, C] float32 of the local-state kernel: the in-block weight of c's
  rows forward (lambda^(C-1-j)) and reverse (lambda^(j+1)), and slope * C broadcast (the
  log-weight per block of distance from the part's end (forward) or start (reverse))."""
  a = slope.astype(_F32)[:, None]
  pos = jnp.arange(block, dtype=_F32)[None, :]
  return jnp.stack([jnp.exp(-a * (block - 1 - pos)), jnp.exp(-a * (pos + 1)),
                    jnp.broadcast_to(a * block, (a.shape[0], block))], axis=1)


def local_state_smem_bytes(block: int, dim: int, stages: int) -> int:
  """Shared memory of one CTA of `_local_states`: `stages` slots of b and c blocks and of the
  weighted c, the weight table, the barriers."""
  num_wg = dim // _VALUE_TILE
  per_stage = (block * dim + 2 * num_wg * block * _VALUE_TILE) * 2
  table = num_wg * 3 * block * 4
  barriers = (stages + stages * num_wg + stages + num_wg) * 8
  return stages * per_stage + table + barriers


def _local_states(b, c, table, *, num_parts: int, first: int, count: int, block: int,
                  num_stages: int, reverse: bool):
  """b, c [B, T, H, D] bf16 cut into num_parts equal parts; table [H, 3, C] f32 -> the local
  states of parts first .. first + count - 1 [B, H, count, D, D] f32 (the docstring of
  `lightning_local_states_mosaic`)."""
  batch, seq_len, heads, dim = b.shape
  part_len = seq_len // num_parts
  vt = _VALUE_TILE
  num_wg = dim // vt
  num_blocks = part_len // block
  stages = min(num_stages, num_blocks)
  wgmma_layout = plgpu.Layout.WGMMA
  rows_layout = plgpu.Layout.WGMMA.reduce(1)
  weight_row = 1 if reverse else 0
  b_parts = b.reshape(batch * num_parts, part_len, heads, dim)
  c_parts = c.reshape(batch * num_parts, part_len, heads, dim)

  def kernel(b_ref, c_ref, table_ref, out_ref, scoped):
    (b_smem, c_smem, cw_smem, table_smem), barriers = scoped
    b_bar, c_bar, consumed_bar, table_bar = barriers
    seq = lax.axis_index("batch") * num_parts + first + lax.axis_index("parts")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")

    @pl.when(wg < num_wg)
    def _compute():
      plgpu.copy_gmem_to_smem(table_ref.at[h], table_smem.at[wg], table_bar.at[wg])
      plgpu.barrier_wait(table_bar.at[wg])
      in_block = _load(table_smem.at[wg, weight_row], rows_layout)  # [C]
      per_block = _load(table_smem.at[wg, 2], rows_layout)  # slope * C, [C]

      def body(n, acc):
        slot = lax.rem(n, stages)
        plgpu.barrier_wait(c_bar.at[slot * num_wg + wg])
        c_tile = plgpu.layout_cast(c_smem.at[slot, wg][...], wgmma_layout)  # [C, vt]
        distance = (n if reverse else num_blocks - 1 - n).astype(_F32)
        weight = in_block * jnp.exp(-per_block * distance)
        weighted = c_tile.astype(_F32) * lax.broadcast_in_dim(weight, (block, vt), [0])
        cw_smem.at[slot, wg][...] = weighted.astype(_BF16)
        plgpu.commit_smem()
        plgpu.barrier_wait(b_bar.at[slot])
        plgpu.wgmma(acc, b_smem.at[slot].transpose((1, 0)), cw_smem.at[slot, wg])
        if stages == 1:  # the next block overwrites this slot: wait for this wgmma
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(consumed_bar.at[slot])
        else:  # the previous block's wgmma is done: release its slot
          plgpu.wgmma_wait(1)

          @pl.when(n > 0)
          def _():
            plgpu.barrier_arrive(consumed_bar.at[lax.rem(n + stages - 1, stages)])
        return acc

      def accumulate(acc):
        acc = lax.fori_loop(0, num_blocks, body, acc)
        plgpu.wgmma_wait(0)
        return acc[...]

      x = pl.run_scoped(accumulate, plgpu.ACC((dim, vt), _F32))
      out_ref.at[lax.axis_index("batch"), h, lax.axis_index("parts"), :, pl.ds(wg * vt, vt)][
          ...] = x

    @pl.when(wg == num_wg)
    def _memory():
      def issue(n, slot):
        rows = pl.ds(n * block, block)
        plgpu.copy_gmem_to_smem(b_ref.at[seq, rows, h], b_smem.at[slot], b_bar.at[slot])
        for w in range(num_wg):
          plgpu.copy_gmem_to_smem(c_ref.at[seq, rows, h, pl.ds(w * vt, vt)], c_smem.at[slot, w],
                                  c_bar.at[slot * num_wg + w])

      _issue_ahead(issue, stages, num_blocks, consumed_bar)

  def entry(b_ref, c_ref, table_ref, out_ref):
    tiled = _SWIZZLED
    smem = (
        plgpu.SMEM((stages, block, dim), _BF16, **tiled),  # b
        plgpu.SMEM((stages, num_wg, block, vt), _BF16, **tiled),  # c, one slice per warpgroup
        plgpu.SMEM((stages, num_wg, block, vt), _BF16, **tiled),  # c weighted by decay
        plgpu.SMEM((num_wg, 3, block), _F32),  # weight table
    )
    barriers = (
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages * num_wg),
        plgpu.Barrier(num_arrivals=num_wg, num_barriers=stages),
        plgpu.Barrier(num_barriers=num_wg),
    )
    pl.run_scoped(lambda *scoped: kernel(b_ref, c_ref, table_ref, out_ref, scoped),
                  smem, barriers, collective_axes="wg")

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((batch, heads, count, dim, dim), _F32),
      grid=(heads, count, batch),
      grid_names=("heads", "parts", "batch"),
      num_threads=num_wg + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(b_parts, c_parts, table)


@functools.partial(jax.jit, static_argnames=("num_parts", "first", "count", "reverse",
                                             "block_size", "num_stages"))
def lightning_local_states_mosaic(b, c, slope, *, num_parts: int, first: int = 0,
                                  count: int | None = None, reverse: bool = False,
                                  block_size: int = 64, num_stages: int = 3):
  """Local states of equal parts of a sweep from a zero start, on Hopper through Mosaic GPU.

  The sequence is cut into num_parts parts of P = T / num_parts tokens; part r's local state is
  the sweep's state over that part alone: forward sum_t lambda^((r+1) P - 1 - t) b_t^T c_t
  (X at the part's last token), reverse sum_t lambda^(t - r P + 1) b_t^T c_t (lambda G at its
  first token). One CTA per (batch, head, part) accumulates K^T (C * weight) block by block in
  one wgmma accumulator, the weight of each row its decay to the part's end (start), so the
  blocks are independent and the loads and wgmmas pipeline like a matmul's.

  Args:
    b, c: [B, T, H, D] bfloat16, D in {64, 128}, T a multiple of num_parts * block_size.
    slope: [H]; the decay per token is exp(-slope).
    num_parts: parts of the sequence.
    first, count: compute parts first .. first + count - 1 only (count None: to the last).
    reverse: the reverse sweep's local states (weights from the part's start).
    block_size: tokens per block, 64 or 128.
    num_stages: SMEM slots for the b, c blocks.

  Returns:
    [B, H, count, D, D] float32.
  """
  _check_operands({"b": b, "c": c}, block_size, num_stages)
  _, seq_len, heads, dim = b.shape
  if num_parts < 1 or seq_len == 0 or seq_len % (num_parts * block_size):
    raise ValueError(f"T={seq_len} must be a positive multiple of num_parts * block_size = "
                     f"{num_parts} * {block_size}")
  count = num_parts - first if count is None else count
  if not 0 <= first < num_parts or not 0 < count <= num_parts - first:
    raise ValueError(f"parts first={first}, count={count} must lie in [0, {num_parts})")
  stages = min(num_stages, seq_len // num_parts // block_size)
  _check_smem(local_state_smem_bytes, block_size, dim, stages)
  if slope.shape != (heads,):
    raise ValueError(f"slope must be [H]=[{heads}]; got {slope.shape}")
  return _local_states(b, c, _state_table(slope, block_size), num_parts=num_parts, first=first,
                       count=count, block=block_size, num_stages=num_stages, reverse=reverse)


@functools.partial(jax.jit, static_argnames=("reverse", "block_size", "num_stages"))
def lightning_sweep_mosaic(a, b, c, slope, start=None, *, reverse: bool = False,
                           block_size: int = 64, num_stages: int = 2):
  """One lightning sweep (module docstring) on Hopper through Mosaic GPU (not differentiable).
  With (a, b, c) = (q, k, v) and reverse=False it is the lightning attention forward.

  Args:
    a, b, c: [B, T, H, D] bfloat16, D in {64, 128}, T a multiple of block_size.
    slope: [H]; the decay per token is exp(-slope).
    start: [B, H, D, D] (float32 accumulation) or None for zeros: the initial state X_{-1}
      (forward) or lambda G_T (reverse).
    reverse: sweep from the last token to the first.
    block_size: tokens per block C, 64 or 128.
    num_stages: SMEM slots for the a, b, c blocks (loads run up to this many blocks ahead).

  Returns:
    out [B, T, H, D] bfloat16 and the final state [B, H, D, D] float32 (X_{T-1} forward,
    lambda G_0 reverse).
  """
  _check_operands({"a": a, "b": b, "c": c}, block_size, num_stages)
  batch, seq_len, heads, dim = a.shape
  if seq_len == 0 or seq_len % block_size:
    raise ValueError(f"T must be a positive multiple of block_size={block_size}; got {seq_len}")
  stages = min(num_stages, seq_len // block_size)
  _check_smem(smem_bytes, block_size, dim, stages)
  if slope.shape != (heads,):
    raise ValueError(f"slope must be [H]=[{heads}]; got {slope.shape}")
  if start is None:
    start = jnp.zeros((batch, heads, dim, dim), _F32)
  elif start.shape != (batch, heads, dim, dim):
    raise ValueError(f"start must be [B, H, D, D]={[batch, heads, dim, dim]}; got "
                     f"{start.shape}")
  table = _decay_table(slope, block_size, dim, reverse)
  return _sweep(a, b, c, table, start.astype(_F32), block=block_size, num_stages=num_stages,
                reverse=reverse)
