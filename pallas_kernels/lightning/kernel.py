"""Lightning attention as Pallas kernels (Triton lowering): forward, backward and decode.

Per head with decay lambda = exp(-slope) and a float32 state that includes the current token:

    S_t = lambda * S_{t-1} + k_t^T v_t,      o_t = q_t S_t.

Every pass of the forward and the backward is one "sweep" of a decayed linear recurrence over
a, b [T, Dk] and c [T, Dv], evaluated in blocks of C tokens (intra-block [(A B^T) * M] C_blk,
inter-block (A * decay) X) with the carried state X kept on chip:

    forward:  X_t = lambda X_{t-1} + b_t^T c_t,  out_t = a_t X_t,  X_{-1} = start, returns X_{T-1};
    reverse:  G_t = lambda G_{t+1} + b_t^T c_t,  out_t = a_t G_t,  lambda G_T = start,
              returns lambda G_0.

With G_t = dL/dS_t (0-based t), the backward is three sweeps:

    dq = forward(a=do, b=v,  c=k,  start S_init^T)           (X_t = S_t^T)
    dv = reverse(a=k,  b=q,  c=do, start dS_final) -> dS_init
    dk = reverse(a=v,  b=do, c=q,  start dS_final^T)          (state G_t^T).

Parallelism: a program owns one value tile (`value_tile` columns of c) of one (batch, head) over
one segment of the sequence. When B * H * tiles is too small to fill the GPU, the sequence is cut
into segments: a first kernel (the pre-pass) computes the local end state (from a zero start) of
each of `state_split` equal parts of every segment, and the sweep kernel, one program per
segment, starts from the decayed sum of the local states of the parts before it. Only one
[D, D] state per part touches HBM; the forward keeps them for dq.

Hopper: for bfloat16 inputs with D in {64, 128} and T a multiple of 64, the sweeps can run the
Mosaic GPU kernels of `pallas_kernels.lightning.mosaic` (TMA loads, wgmma, one CTA per (batch,
head) and segment, both directions); when B * H is below `min_programs` the sequence is cut into
equal segments whose start states come from the Mosaic local-state kernel (the parts before
each segment, `state_split` parts per segment) and one weighted sum over parts (an einsum); no
Triton kernel runs on that path.
`KernelConfig.forward_impl` picks the forward's kernel and `KernelConfig.backward_impl` the
backward's three sweeps (by default the Mosaic one, faster than the Triton sweeps:
docs/benchmarks.md).

`slope` is not differentiated (its cotangent is zero): it is a fixed per-layer constant in
MiniMax-M1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.platform import is_hopper

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiling of the sweep kernels.

  Attributes:
    block_size: tokens per block C (power of two >= 16; capped at T rounded up to a power of 2).
    value_tile: value columns per program (power of two >= 16; capped at D).
    min_programs: when B * H * tiles is below this, the sequence is cut into
      ceil(min_programs / (B * H * tiles)) segments (at most one per block).
    segment_len: explicit segment length in tokens (rounded up to a multiple of block_size);
      overrides min_programs. A value >= T means one segment.
    num_warps: Triton warps per program.
    state_block_size: tokens per block of the pre-pass (power of two >= 16). That pass has no
      intra-block term, so a larger block costs no extra FLOPs and cuts its serial steps. Used
      when it divides the length of a part (below), else block_size is used. The Mosaic
      local-state kernel takes 64 or 128 (other values: 64).
    state_split: pre-pass programs per segment: each segment's local state is computed in this
      many parts in parallel (the largest divisor of the segment's block count up to this
      value), which shortens the pre-pass by as much; the sweep then sums that many more
      states. 1 computes one local state per segment. The Mosaic path honours it too.
    state_num_stages: pipelining depth of the pre-pass; None: for Triton num_stages, at most 2
      when state_block_size > block_size (shared memory); for the Mosaic local-state kernel as
      many as fit at D = 128 (4 at block 64, 2 at 128), which also caps a given value.
    forward_impl: "auto" (the Mosaic GPU kernels wherever they apply: compiled, a GPU of
      compute capability 9.x, bfloat16, D in {64, 128}, T a multiple of 64; else Triton),
      "mosaic" (those kernels or an error) or "triton" (the portable path).
    backward_impl: the same choice for the backward's three sweeps (dq forward, dv and dk
      reverse). On an H200 the Mosaic path is as fast as the Triton one or faster at every
      benchmark shape, forward + backward; only the forward at T = 8K, H = 16 is 0-11% slower
      (docs/benchmarks.md).
    num_stages: Triton software-pipelining depth of the block loop. Each stage holds a block
      of a, b and c in shared memory: block 128 x value tile 128 with 3 stages exceeds the
      H200's 227 KiB (the compiler asked for 288 KiB); the default's blocks take 40 KiB a stage.
  """
  block_size: int = 64
  value_tile: int = 64
  state_block_size: int = 64
  state_split: int = 1
  state_num_stages: int | None = None
  min_programs: int = 128
  segment_len: int | None = None
  num_warps: int = 4
  num_stages: int = 3
  forward_impl: str = "auto"
  backward_impl: str = "auto"

  def validate(self) -> None:
    """Raises ValueError naming the first field the kernels cannot honour."""
    for name in ("block_size", "value_tile", "state_block_size"):
      value = getattr(self, name)
      if not _is_power_of_two(value) or value < 16:
        raise ValueError(f"KernelConfig.{name}={value!r}: must be a power of two >= 16")
    for name in ("state_split", "num_warps", "num_stages", "min_programs"):
      if getattr(self, name) < 1:
        raise ValueError(f"KernelConfig.{name}={getattr(self, name)!r}: must be >= 1")
    for name in ("forward_impl", "backward_impl"):
      if getattr(self, name) not in SWEEP_IMPLS:
        raise ValueError(f"KernelConfig.{name}={getattr(self, name)!r}: must be one of "
                         f"{SWEEP_IMPLS}")
    if self.state_num_stages is not None and self.state_num_stages < 1:
      raise ValueError(f"KernelConfig.state_num_stages={self.state_num_stages!r}: must be >= 1 "
                       "or None")
    if self.segment_len is not None and self.segment_len <= 0:
      raise ValueError(f"KernelConfig.segment_len={self.segment_len!r}: must be positive or None")


SWEEP_IMPLS = ("auto", "mosaic", "triton")
DEFAULT_CONFIG = KernelConfig()


def _is_power_of_two(n: int) -> bool:
  return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static tiling of one call, derived from the shapes and a KernelConfig."""
  seq_len: int
  block: int
  value_tile: int
  seg_len: int
  num_segments: int
  num_warps: int
  num_stages: int
  # The pre-pass: parts of part_len tokens (state_split per segment), in blocks of state_block.
  part_len: int
  num_parts: int
  state_block: int
  state_num_stages: int


def _plan(batch: int, seq_len: int, heads: int, dim: int, config: KernelConfig) -> _Plan:
  block = min(config.block_size, max(16, _next_power_of_two(seq_len)))
  value_tile = min(config.value_tile, dim)
  num_blocks = -(-seq_len // block)
  if config.segment_len is not None:
    blocks_per_seg = -(-config.segment_len // block)
  else:
    programs = batch * heads * (dim // value_tile)
    wanted = min(num_blocks, max(1, -(-config.min_programs // programs)))
    blocks_per_seg = -(-num_blocks // wanted)
  blocks_per_seg = max(1, min(blocks_per_seg, num_blocks))
  seg_len = blocks_per_seg * block
  split = max(1, min(config.state_split, blocks_per_seg))
  while blocks_per_seg % split:
    split -= 1
  part_len = seg_len // split
  state_block = config.state_block_size if part_len % config.state_block_size == 0 else block
  state_num_stages = config.state_num_stages
  if state_num_stages is None:
    state_num_stages = config.num_stages if state_block <= block else min(config.num_stages, 2)
  return _Plan(seq_len=seq_len, block=block, value_tile=value_tile, seg_len=seg_len,
               num_segments=-(-seq_len // seg_len), num_warps=config.num_warps,
               num_stages=config.num_stages, part_len=part_len,
               num_parts=-(-seq_len // part_len), state_block=state_block,
               state_num_stages=state_num_stages)


def _compute_dtype(dtype):
  """Matmul operand dtype: 16-bit inputs feed the tensor cores, float32 stays float32."""
  return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(_F32)


def _dot(x, y, compute_dtype):
  """x @ y with float32 accumulation; float32 operands stay IEEE float32 (not TF32)."""
  precision = _HI if compute_dtype == jnp.dtype(_F32) else None
  return jnp.dot(x.astype(compute_dtype), y.astype(compute_dtype), precision=precision,
                 preferred_element_type=_F32)


def _block_decays(a, pos, m, reverse):
  """Per-row decays of one block of m valid tokens (rows >= m are padding).

  Returns (out_decay [C], in_decay [C]): forward lambda^(i+1) and lambda^(m-1-i), the mirror
  image in reverse. Exponents are clamped at 0 on padding rows to stay finite.
  """
  near, far = pos + 1, jnp.maximum(m - 1 - pos, 0)
  out_exp, in_exp = (far, near) if reverse else (near, far)
  return jnp.exp(-a * out_exp.astype(_F32)), jnp.exp(-a * in_exp.astype(_F32))


def _block_loop_bounds(seq_len: int, seg_len: int, block: int):
  """(start, number of `block`-token blocks) of this program's stretch of seg_len tokens."""
  seg_start = pl.program_id(1) * seg_len
  seg_tokens = jnp.minimum(seg_len, seq_len - seg_start)
  return seg_start, (seg_tokens + block - 1) // block


def _load_block(ref, rows, valid):
  return pltriton.load(ref.at[rows, :], mask=valid, other=0)


def _segment_start_state(a, x0_ref, local_ref, plan: _Plan, reverse: bool):
  """State before this program's segment (in sweep order): the sweep's start state and the
  local states of the pre-pass parts before the segment, each decayed over the tokens between.

  Forward, segment s of length L, parts of length P: lambda^(s L) X0 +
  sum_{r < s L / P} lambda^(s L - (r + 1) P) local[r]; reverse, mirrored (local[r] is taken at
  the part's start; only the last part is ragged and it is never between two others).
  """
  x = x0_ref[...].astype(_F32)
  if local_ref is None:
    return x
  seg = pl.program_id(1)
  seg_len, part_len = plan.seg_len, plan.part_len
  parts_per_seg = seg_len // part_len
  if reverse:
    seg_end = (seg + 1) * seg_len
    x0_gap = plan.seq_len - jnp.minimum(seg_end, plan.seq_len)
    first = (seg + 1) * parts_per_seg
    num_earlier = jnp.maximum(plan.num_parts - first, 0)
  else:
    x0_gap = seg * seg_len
    num_earlier = seg * parts_per_seg

  def add(i, x):
    if reverse:
      r, gap = first + i, i * part_len + (first * part_len - seg_end)
    else:
      r, gap = num_earlier - 1 - i, i * part_len
    return x + jnp.exp(-a * gap.astype(_F32)) * local_ref[r]

  return lax.fori_loop(0, num_earlier, add, jnp.exp(-a * x0_gap.astype(_F32)) * x)


def _sweep_kernel(slope_ref, a_ref, b_ref, c_ref, x0_ref, *refs, plan: _Plan, reverse: bool):
  """One value tile of one (batch, head) over one segment; writes out and the terminal state."""
  local_ref, out_ref, x_end_ref = refs if len(refs) == 3 else (None, *refs)
  a = slope_ref[...].astype(_F32)
  cd = _compute_dtype(a_ref.dtype)
  seg_start, num_blocks = _block_loop_bounds(plan.seq_len, plan.seg_len, plan.block)
  pos = jnp.arange(plan.block, dtype=jnp.int32)
  gap = (pos[None, :] - pos[:, None]) if reverse else (pos[:, None] - pos[None, :])
  intra_mask = jnp.where(gap >= 0, jnp.exp(-a * jnp.maximum(gap, 0).astype(_F32)), 0.0)

  def body(n, x):
    blk = num_blocks - 1 - n if reverse else n
    start = seg_start + blk * plan.block
    m = jnp.minimum(plan.block, plan.seq_len - start)
    rows = pl.ds(start, plan.block)
    valid = (pos < m)[:, None]
    a_blk = _load_block(a_ref, rows, valid)
    b_blk = _load_block(b_ref, rows, valid)
    c_blk = _load_block(c_ref, rows, valid)
    out_decay, in_decay = _block_decays(a, pos, m, reverse)
    scores = _dot(a_blk, b_blk.T, cd) * intra_mask
    out = _dot(scores, c_blk, cd) + _dot(a_blk * out_decay[:, None], x, cd)
    pltriton.store(out_ref.at[rows, :], out.astype(out_ref.dtype), mask=valid)
    b_scaled = (b_blk * in_decay[:, None]).astype(cd)
    return jnp.exp(-a * m.astype(_F32)) * x + _dot(b_scaled.T, c_blk, cd)

  x = lax.fori_loop(0, num_blocks, body,
                    _segment_start_state(a, x0_ref, local_ref, plan, reverse))
  terminal = 0 if reverse else plan.num_segments - 1

  @pl.when(pl.program_id(1) == terminal)
  def _():
    x_end_ref[...] = x


def _segment_state_kernel(slope_ref, b_ref, c_ref, x_ref, *, plan: _Plan, reverse: bool):
  """Local state of one pre-pass part from a zero start: sum_t lambda^(distance to the part's
  end (forward) or start (reverse)) b_t^T c_t over the part's tokens."""
  a = slope_ref[...].astype(_F32)
  cd = _compute_dtype(b_ref.dtype)
  block = plan.state_block
  seg_start, num_blocks = _block_loop_bounds(plan.seq_len, plan.part_len, block)
  pos = jnp.arange(block, dtype=jnp.int32)

  def body(n, x):
    blk = num_blocks - 1 - n if reverse else n
    start = seg_start + blk * block
    m = jnp.minimum(block, plan.seq_len - start)
    rows = pl.ds(start, block)
    valid = (pos < m)[:, None]
    b_blk = _load_block(b_ref, rows, valid)
    c_blk = _load_block(c_ref, rows, valid)
    _, in_decay = _block_decays(a, pos, m, reverse)
    b_scaled = (b_blk * in_decay[:, None]).astype(cd)
    return jnp.exp(-a * m.astype(_F32)) * x + _dot(b_scaled.T, c_blk, cd)

  x_ref[...] = lax.fori_loop(0, num_blocks, body, jnp.zeros(x_ref.shape, _F32))


def _grid(plan: _Plan, num_segments: int, batch: int, heads: int, dim_v: int):
  # Value tiles vary fastest, so programs that share a block of a and b run side by side.
  return (dim_v // plan.value_tile, num_segments, heads, batch)


def _full_seq_spec(seq_len, dim):
  return pl.BlockSpec((None, seq_len, None, dim), lambda j, s, h, b: (b, 0, h, 0))


def _tiled_seq_spec(seq_len, tile):
  return pl.BlockSpec((None, seq_len, None, tile), lambda j, s, h, b: (b, 0, h, j))


def _slope_spec():
  return pl.BlockSpec((None,), lambda j, s, h, b: (h,))


def _compiler_params(plan: _Plan, num_stages: int):
  return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=num_stages)


def _segment_states(b, c, slope, plan: _Plan, reverse: bool, interpret: bool):
  """Each pre-pass part's local state from a zero start. b [B, T, H, Dk], c [B, T, H, Dv] ->
  [B, H, P, Dk, Dv] float32 for P parts."""
  batch, seq_len, heads, dim_k = b.shape
  dim_v = c.shape[-1]
  return pl.pallas_call(
      functools.partial(_segment_state_kernel, plan=plan, reverse=reverse),
      grid=_grid(plan, plan.num_parts, batch, heads, dim_v),
      in_specs=[_slope_spec(), _full_seq_spec(seq_len, dim_k),
                _tiled_seq_spec(seq_len, plan.value_tile)],
      out_specs=pl.BlockSpec((None, None, None, dim_k, plan.value_tile),
                             lambda j, s, h, b: (b, h, s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((batch, heads, plan.num_parts, dim_k, dim_v), _F32),
      compiler_params=_compiler_params(plan, plan.state_num_stages),
      interpret=interpret,
      name="lightning_segment_states",
  )(slope, b, c)


def _sweep(a, b, c, slope, x0, plan: _Plan, *, reverse: bool, interpret: bool, local=None):
  """Chunked decayed recurrence (module docstring). a, b [B, T, H, Dk]; c [B, T, H, Dv];
  slope [H]; x0 [B, H, Dk, Dv] float32 start state -> (out [B, T, H, Dv] in a.dtype, terminal
  state [B, H, Dk, Dv] float32, the parts' local states [B, H, P, Dk, Dv] or None if there is
  one segment).
  `local` skips computing the local states when the caller has them."""
  batch, seq_len, heads, dim_k = a.shape
  dim_v = c.shape[-1]
  state_tile = (dim_k, plan.value_tile)
  in_specs = [
      _slope_spec(),
      _full_seq_spec(seq_len, dim_k),
      _full_seq_spec(seq_len, dim_k),
      _tiled_seq_spec(seq_len, plan.value_tile),
      pl.BlockSpec((None, None, *state_tile), lambda j, s, h, b: (b, h, 0, j)),
  ]
  operands = [slope, a, b, c, x0]
  if plan.num_segments > 1:
    if local is None:
      local = _segment_states(b, c, slope, plan, reverse, interpret)
    in_specs.append(pl.BlockSpec((None, None, plan.num_parts, *state_tile),
                                 lambda j, s, h, b: (b, h, 0, 0, j)))
    operands.append(local)
  else:
    local = None
  out, x_end = pl.pallas_call(
      functools.partial(_sweep_kernel, plan=plan, reverse=reverse),
      grid=_grid(plan, plan.num_segments, batch, heads, dim_v),
      in_specs=in_specs,
      out_specs=[
          _tiled_seq_spec(seq_len, plan.value_tile),
          pl.BlockSpec((None, None, *state_tile), lambda j, s, h, b: (b, h, 0, j)),
      ],
      out_shape=[jax.ShapeDtypeStruct((batch, seq_len, heads, dim_v), a.dtype),
                 jax.ShapeDtypeStruct((batch, heads, dim_k, dim_v), _F32)],
      compiler_params=_compiler_params(plan, plan.num_stages),
      interpret=interpret,
      name="lightning_sweep_reverse" if reverse else "lightning_sweep",
  )(*operands)
  return out, x_end, local


def _transpose_state(x):
  return None if x is None else jnp.swapaxes(x, -1, -2)


_MOSAIC_BLOCK = 64  # token block of the Mosaic GPU sweeps
# SMEM stages of the Mosaic local-state kernel per token block: the default and the cap (as
# many as fit at D = 128; at block 64, 4 stages took 0.065 ms where 3 took 0.072 and 2 0.108 on
# an H200 at B 1, T 32K, H 16).
_MOSAIC_STATE_STAGES = {64: 4, 128: 2}


def _use_mosaic(q, config: KernelConfig, interpret: bool, field: str = "forward_impl") -> bool:
  """Whether the sweeps of `field` (KernelConfig.forward_impl or .backward_impl) run the Mosaic
  GPU kernel."""
  choice = getattr(config, field)
  if choice == "triton":
    return False
  _, seq_len, _, dim = q.shape
  unmet = []
  if interpret:
    unmet.append("compiled mode (it has no interpreter)")
  elif not is_hopper():
    unmet.append("a GPU of compute capability 9.x (Hopper)")
  if jnp.dtype(q.dtype) != jnp.dtype(jnp.bfloat16):
    unmet.append(f"bfloat16 inputs (got {q.dtype})")
  if dim not in (64, 128):
    unmet.append(f"D in (64, 128) (got {dim})")
  if seq_len % _MOSAIC_BLOCK:
    unmet.append(f"T a multiple of {_MOSAIC_BLOCK} (got {seq_len})")
  if unmet and choice == "mosaic":
    raise ValueError(f"{field}='mosaic' needs " + ", ".join(unmet))
  return not unmet


def _mosaic_plan(batch: int, seq_len: int, heads: int, dim: int, config: KernelConfig) -> _Plan:
  """The Mosaic sweeps' segments (one CTA per (batch, head, segment)): as many equal segments
  of whole 64-token blocks as bring B * H up to min_programs, each cut into state_split parts
  (at most) for the local-state kernel."""
  blocks = seq_len // _MOSAIC_BLOCK
  wanted = min(blocks, max(1, -(-config.min_programs // (batch * heads))))
  segments = max(n for n in range(1, wanted + 1) if blocks % n == 0)
  plan = _plan(batch, seq_len, heads, dim,
               dataclasses.replace(config, block_size=_MOSAIC_BLOCK,
                                   segment_len=seq_len // segments))
  state_block = plan.state_block if plan.state_block in _MOSAIC_STATE_STAGES else _MOSAIC_BLOCK
  most = _MOSAIC_STATE_STAGES[state_block]
  return dataclasses.replace(plan, state_block=state_block,
                             state_num_stages=min(config.state_num_stages or most, most))


def _needed_parts(plan: _Plan, reverse: bool) -> tuple[int, int]:
  """(first, count) of the parts whose local states some segment starts from: all but the last
  segment's (forward) or the first segment's (reverse)."""
  per_segment = plan.seg_len // plan.part_len
  return (per_segment if reverse else 0), plan.num_parts - per_segment


def _segment_starts(local, x0, slope, plan: _Plan, reverse: bool):
  """Start state of every segment (in sweep order) from the local states of the needed parts
  (`_needed_parts`) and the sweep's start state, in one einsum over parts. local
  [B, H, R, D, D]; x0 [B, H, D, D] -> [B, N, H, D, D] float32.

  Forward, segment n of length L, parts of length P: lambda^(n L) x0 +
  sum_{r < n L / P} lambda^(n L - (r + 1) P) local[r]; reverse: lambda^(T - (n + 1) L) x0 +
  sum_{r >= (n + 1) L / P} lambda^(r P - (n + 1) L) local[r].
  """
  first, count = _needed_parts(plan, reverse)
  seg = jnp.arange(plan.num_segments)[:, None]
  part = first + jnp.arange(count)[None, :]
  if reverse:
    gap = part * plan.part_len - (seg + 1) * plan.seg_len
    x0_gap = plan.seq_len - (seg[:, 0] + 1) * plan.seg_len
  else:
    gap = seg * plan.seg_len - (part + 1) * plan.part_len
    x0_gap = seg[:, 0] * plan.seg_len
  a = slope.astype(_F32)[:, None, None]
  weights = jnp.where(gap >= 0, jnp.exp(-a * jnp.maximum(gap, 0).astype(_F32)), 0.0)  # [H, N, R]
  x0_weights = jnp.exp(-a[:, :, 0] * x0_gap.astype(_F32))  # [H, N]
  # A batched [N, R] x [R, D * D] product per head, in IEEE float32 (not TF32).
  from_parts = jnp.einsum("hnr,bhrde->bnhde", weights, local, precision=_HI)
  return from_parts + jnp.einsum("hn,bhde->bnhde", x0_weights, x0, precision=_HI)


def _mosaic_sweep(a, b, c, slope, x0, plan: _Plan, *, reverse: bool, interpret: bool,
                  local=None, kernel=None, local_states=None):
  """`_sweep` by the Mosaic GPU kernels over plan.num_segments equal segments, run as B * N
  independent sequences whose start states come from the local-state kernel (or `local`) and
  `_segment_starts`. a, b, c [B, T, H, D]; x0 [B, H, D, D] -> (out [B, T, H, D], terminal
  state [B, H, D, D], the needed parts' local states or None).
  `kernel(a, b, c, slope, start, reverse=...)` and `local_states(b, c, slope, num_parts=, first=,
  count=, reverse=)` default to the Mosaic kernels (tests pass others)."""
  del interpret  # the Mosaic kernels have no interpreter
  if kernel is None or local_states is None:  # imported here: Mosaic GPU costs 0.24 s of import
    from pallas_kernels.lightning import mosaic  # pylint: disable=g-import-not-at-top
    kernel = kernel or mosaic.lightning_sweep_mosaic
    local_states = local_states or functools.partial(
        mosaic.lightning_local_states_mosaic, num_stages=plan.state_num_stages,
        block_size=plan.state_block)
  batch, seq_len, heads, dim = a.shape
  num_segments = plan.num_segments
  if num_segments == 1:
    return (*kernel(a, b, c, slope, x0, reverse=reverse), None)
  if local is None:
    first, count = _needed_parts(plan, reverse)
    local = local_states(b, c, slope, num_parts=plan.num_parts, first=first, count=count,
                         reverse=reverse)
  starts = _segment_starts(local, x0, slope, plan, reverse)
  starts = starts.reshape(batch * num_segments, heads, dim, dim)
  as_sequences = lambda x: x.reshape(batch * num_segments, plan.seg_len, heads, dim)
  out, finals = kernel(as_sequences(a), as_sequences(b), as_sequences(c), slope, starts,
                       reverse=reverse)
  finals = finals.reshape(batch, num_segments, heads, dim, dim)
  return out.reshape(a.shape), finals[:, 0 if reverse else -1], local


def _sweeper(plan: _Plan, mosaic_plan: _Plan | None, slope, interpret: bool):
  """The sweep of one pass: `_mosaic_sweep` under mosaic_plan, else the Triton `_sweep`."""
  if mosaic_plan is None:
    return functools.partial(_sweep, slope=slope, plan=plan, interpret=interpret)
  return functools.partial(_mosaic_sweep, slope=slope, plan=mosaic_plan, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _lightning(q, k, v, slope, initial_state, plan: _Plan, forward_mosaic: _Plan | None,
               backward_mosaic: _Plan | None, interpret: bool):
  o, final_state, _ = _sweeper(plan, forward_mosaic, slope, interpret)(
      q, k, v, x0=initial_state, reverse=False)
  return o, final_state


def _lightning_fwd(q, k, v, slope, initial_state, plan, forward_mosaic, backward_mosaic,
                   interpret):
  o, final_state, local = _sweeper(plan, forward_mosaic, slope, interpret)(
      q, k, v, x0=initial_state, reverse=False)
  if (forward_mosaic or plan) != (backward_mosaic or plan):
    local = None  # the backward's segments differ: its dq sweep makes its own local states
  return (o, final_state), (q, k, v, slope, initial_state, local)


def _lightning_bwd(plan, forward_mosaic, backward_mosaic, interpret, residuals, cotangents):
  del forward_mosaic
  q, k, v, slope, initial_state, local = residuals
  do, d_final = cotangents
  do = do.astype(q.dtype)
  d_final = d_final.astype(_F32)
  sweep = _sweeper(plan, backward_mosaic, slope, interpret)
  dq, _, _ = sweep(do, v, k, x0=_transpose_state(initial_state), reverse=False,
                   local=_transpose_state(local))
  dv, d_initial, local_reverse = sweep(k, q, do, x0=d_final, reverse=True)
  dk, _, _ = sweep(v, do, q, x0=_transpose_state(d_final), reverse=True,
                   local=_transpose_state(local_reverse))
  return dq, dk, dv, jnp.zeros_like(slope), d_initial


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def _check_backend(interpret: bool):
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"interpret=False needs a GPU backend (Triton lowering); the default backend "
                     f"is {jax.default_backend()!r}: pass interpret=True to run on it")


def _check_dim(name: str, value: int):
  if not _is_power_of_two(value) or value < 16:
    raise ValueError(f"{name} must be a power of two >= 16; got {value}")


def _check_inputs(q, k, v, slope, initial_state, config: KernelConfig):
  if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"q, k, v must all be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  if q.dtype != k.dtype or q.dtype != v.dtype or jnp.dtype(q.dtype) not in _DTYPES:
    raise ValueError(f"q, k, v must share one dtype among bfloat16, float16, float32; got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  batch, _, heads, dim = q.shape
  _check_dim("head dim D", dim)
  config.validate()
  if slope.shape != (heads,):
    raise ValueError(f"slope must be [H]=[{heads}]; got {slope.shape}")
  if initial_state is not None and initial_state.shape != (batch, heads, dim, dim):
    raise ValueError(f"initial_state must be [B, H, D, D]={[batch, heads, dim, dim]}; got "
                     f"{initial_state.shape}")


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def lightning_attention_pallas(q, k, v, slope, initial_state=None, *, interpret: bool = False,
                               config: KernelConfig = DEFAULT_CONFIG):
  """Lightning attention by the Pallas kernels, differentiable in q, k, v and initial_state.

  Args:
    q, k, v: [B, T, H, D] in bfloat16, float16 or float32 (one dtype); any T; D a power of 2.
    slope: [H]; the decay per token is exp(-slope). Not differentiated (zero cotangent).
    initial_state: [B, H, D, D] (float32 accumulation) or None for zeros.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    config: tiling and forward kernel (KernelConfig).

  Returns:
    o [B, T, H, D] in q.dtype and the final state [B, H, D, D] in float32.
  """
  _check_backend(interpret)
  _check_inputs(q, k, v, slope, initial_state, config)
  batch, seq_len, heads, dim = q.shape
  if initial_state is None:
    initial_state = jnp.zeros((batch, heads, dim, dim), _F32)
  plan = _plan(batch, seq_len, heads, dim, config)

  def mosaic_plan(field):
    """The Mosaic plan of the forward or backward sweeps, or None for the Triton ones."""
    if not _use_mosaic(q, config, interpret, field):
      return None
    return _mosaic_plan(batch, seq_len, heads, dim, config)

  return _lightning(q, k, v, slope.astype(_F32), initial_state.astype(_F32), plan,
                    mosaic_plan("forward_impl"), mosaic_plan("backward_impl"), interpret)


def _decode_kernel(layer_ref, slope_ref, q_ref, k_ref, v_ref, states_ref, o_ref,
                   new_states_ref, *, tile: int):
  """One (value tile, head, row): S' = lambda S + k^T v on row `layer` of the stacked states,
  o = q S'. The states refs are whole arrays (aliased), so only this tile is read and written."""
  j, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  at = (layer_ref[0], b, h, slice(None), pl.ds(j * tile, tile))
  decay = jnp.exp(-slope_ref[...].astype(_F32))
  q = q_ref[...].astype(_F32)
  k = k_ref[...].astype(_F32)
  v = v_ref[...].astype(_F32)
  state = decay * states_ref[at] + k[:, None] * v[None, :]
  o_ref[...] = jnp.sum(q[:, None] * state, axis=0).astype(o_ref.dtype)
  new_states_ref[at] = state


# The Triton lowering addresses the stacked states with 32-bit offsets.
MAX_DECODE_STATE_ELEMENTS = 2**31 - 1


@functools.partial(jax.jit, static_argnames=("interpret", "value_tile", "num_warps"))
def lightning_attention_decode_pallas(q, k, v, slope, states, layer, *, interpret: bool = False,
                                      value_tile: int = 64, num_warps: int = 4):
  """One token per sequence on row `layer` of stacked states, updated in place.

  q, k, v [B, H, D]; slope [H]; states [L, B, H, D, D] float32; layer int32 [] (0 <= layer < L).
  Returns (o [B, H, D] in q.dtype, states with row `layer` replaced by the new state). The
  result aliases `states`: inside a jitted loop that carries the states (the layer scan, the
  decode loop) XLA updates the one buffer in place, reading and writing one row per call.
  """
  _check_backend(interpret)
  if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"q, k, v must all be [B, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  batch, heads, dim = q.shape
  _check_dim("head dim D", dim)
  _check_dim("value_tile", value_tile)
  if slope.shape != (heads,):
    raise ValueError(f"slope must be [H]=[{heads}]; got {slope.shape}")
  if states.ndim != 5 or states.shape[1:] != (batch, heads, dim, dim):
    raise ValueError(f"states must be [L, B, H, D, D] with [B, H, D, D]="
                     f"{[batch, heads, dim, dim]}; got {states.shape}")
  if states.size > MAX_DECODE_STATE_ELEMENTS:
    raise ValueError(f"states {states.shape} have {states.size} elements, more than the "
                     f"decode kernel addresses ({MAX_DECODE_STATE_ELEMENTS}); use impl='auto' or "
                     "'blockwise' (the jnp step)")
  tile = min(value_tile, dim)
  vec = pl.BlockSpec((None, None, dim), lambda j, h, b: (b, h, 0))
  vec_tile = pl.BlockSpec((None, None, tile), lambda j, h, b: (b, h, j))
  whole = pl.BlockSpec(states.shape, lambda j, h, b: (0, 0, 0, 0, 0))
  return pl.pallas_call(
      functools.partial(_decode_kernel, tile=tile),
      grid=(dim // tile, heads, batch),
      in_specs=[pl.BlockSpec((1,), lambda j, h, b: (0,)),
                pl.BlockSpec((None,), lambda j, h, b: (h,)), vec, vec, vec_tile, whole],
      out_specs=[vec_tile, whole],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(states.shape, _F32)],
      input_output_aliases={5: 1},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="lightning_decode",
  )(jnp.reshape(layer, (1,)).astype(jnp.int32), slope.astype(_F32), q, k, v,
    states.astype(_F32))
