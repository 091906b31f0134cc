"""Pallas lightning attention kernels vs the token-by-token recurrence (pallas_kernels.lightning.reference).

CPU tests run the kernels with interpret=True on small shapes; the tests marked `gpu` run the same
checks compiled through Triton at D = 64 and 128. Errors are norm-wise, ||got - ref|| / ||ref||.
Tolerances: float32 inputs 1e-5 (float32 arithmetic throughout, rounding ~1e-7 times the length of
the decay sums); bfloat16 inputs 1e-2 (matmul operands and outputs rounded to bfloat16, 2^-9
relative each).
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import reference
from pallas_kernels import KernelConfig
from pallas_kernels import lightning_attention
from pallas_kernels import lightning_attention_decode

kernel_module = importlib.import_module("pallas_kernels.lightning.kernel")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Heads with a strong decay (lambda = 0.135), a moderate one and a near-1 one (0.9999).
SLOPES = (2.0, 0.05, 1e-4)
# Small tiles for the interpreter: 3 segments of 16 tokens over T = 40 (the last block is ragged).
CPU_SEGMENTED = KernelConfig(block_size=16, value_tile=16, segment_len=16)
CPU_ONE_SEGMENT = KernelConfig(block_size=16, value_tile=32, segment_len=1 << 20)
# Segments of 32 tokens whose local states are summed in 32-token blocks (state_block_size).
CPU_STATE_BLOCKS = KernelConfig(block_size=16, value_tile=16, segment_len=32, state_block_size=32)
# Segments of 32 tokens whose local states are computed in two parallel parts of 16.
CPU_PARTS = KernelConfig(block_size=16, value_tile=16, segment_len=32, state_split=2)
# Both: segments of 64, parts of 32 summed in 32-token blocks.
CPU_PARTS_STATE_BLOCKS = KernelConfig(block_size=16, value_tile=16, segment_len=64, state_split=2,
                                      state_block_size=32)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values in the kernel output"
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _inputs(seed, batch, seq_len, dim, dtype, with_state=True):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, seq_len, len(SLOPES), dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32) * dim ** -0.25 for key in keys[:3])
  state = (jax.random.normal(keys[3], (batch, len(SLOPES), dim, dim), jnp.float32)
           if with_state else None)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), jnp.array(SLOPES, jnp.float32), state


def _check_forward(dtype, batch, seq_len, dim, config, interpret, with_state=True, seed=0):
  q, k, v, slope, state = _inputs(seed, batch, seq_len, dim, dtype, with_state)
  o, final = lightning_attention(q, k, v, slope, state, interpret=interpret, config=config)
  o_ref, final_ref = reference.lightning_attention_recurrent(q, k, v, slope, state)
  assert o.dtype == q.dtype and final.dtype == jnp.float32
  assert o.shape == q.shape and final.shape == final_ref.shape
  assert _rel_err(o, o_ref) <= TOL[dtype]
  assert _rel_err(final, final_ref) <= TOL[dtype]


def _check_vjp(dtype, batch, seq_len, dim, config, interpret, seed=1):
  q, k, v, slope, state = _inputs(seed, batch, seq_len, dim, dtype)
  keys = jax.random.split(jax.random.key(seed + 100), 2)
  d_o = jax.random.normal(keys[0], q.shape, jnp.float32).astype(dtype)
  d_final = jax.random.normal(keys[1], state.shape, jnp.float32)

  def kernel(q, k, v, slope, state):
    return lightning_attention(q, k, v, slope, state, interpret=interpret, config=config)

  _, vjp = jax.vjp(kernel, q, k, v, slope, state)
  _, vjp_ref = jax.vjp(reference.lightning_attention_recurrent, q, k, v, slope, state)
  grads, grads_ref = vjp((d_o, d_final)), vjp_ref((d_o, d_final))
  for name, got, want in zip(("dq", "dk", "dv"), grads[:3], grads_ref[:3]):
    assert got.dtype == dtype, name
    assert _rel_err(got, want) <= TOL[dtype], name
  np.testing.assert_array_equal(grads[3], np.zeros(len(SLOPES)))  # slope is not differentiated
  assert _rel_err(grads[4], grads_ref[4]) <= TOL[dtype], "d initial_state"


def _check_decode(dtype, batch, dim, interpret, value_tile, seed=2):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, len(SLOPES), dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
  state = jax.random.normal(keys[3], (batch, len(SLOPES), dim, dim), jnp.float32)
  slope = jnp.array(SLOPES, jnp.float32)
  o_ref, state_ref = reference.lightning_decode_step(q, k, v, slope, state)
  o, new_state = lightning_attention_decode(q, k, v, slope, state, interpret=interpret,
                                            value_tile=value_tile)
  assert o.dtype == dtype and new_state.dtype == jnp.float32
  assert _rel_err(o, o_ref) <= TOL[dtype]
  assert _rel_err(new_state, state_ref) <= TOL[dtype]
  # Row 1 of three stacked states, updated in place: the other rows come back bit for bit.
  others = jax.random.normal(keys[0], (2,) + state.shape, jnp.float32)
  states = jnp.stack([others[0], state, others[1]])
  step = jax.jit(functools.partial(lightning_attention_decode, interpret=interpret,
                                   value_tile=value_tile), donate_argnums=4)
  o_row, new_states = step(q, k, v, slope, states, jnp.int32(1))
  np.testing.assert_array_equal(o_row, o)
  np.testing.assert_array_equal(new_states[1], new_state)
  np.testing.assert_array_equal(new_states[0], others[0])
  np.testing.assert_array_equal(new_states[2], others[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("config", [CPU_SEGMENTED, CPU_ONE_SEGMENT, CPU_STATE_BLOCKS, CPU_PARTS],
                         ids=["segments", "one", "state_blocks", "parts"])
def test_forward_matches_recurrent(dtype, config):
  _check_forward(dtype, batch=2, seq_len=40, dim=32, config=config, interpret=True)


def test_forward_without_initial_state():
  _check_forward(jnp.float32, batch=1, seq_len=24, dim=16, config=CPU_SEGMENTED, interpret=True,
                 with_state=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vjp_matches_recurrent(dtype):
  _check_vjp(dtype, batch=2, seq_len=40, dim=32, config=CPU_SEGMENTED, interpret=True)


def test_vjp_one_segment():
  _check_vjp(jnp.float32, batch=1, seq_len=40, dim=32, config=CPU_ONE_SEGMENT, interpret=True)


def _float64_recurrence_vjp(q, k, v, slope, state, d_o, d_final):
  """Gradients (dq, dk, dv, d initial_state) of the recurrence computed in float64 (numpy
  inputs; jax's x64 mode only inside)."""
  with jax.enable_x64(True):
    def recurrence(q, k, v, state):
      decay = jnp.exp(-jnp.asarray(slope, jnp.float64))[None, :, None, None]

      def step(s, qkv_t):
        q_t, k_t, v_t = qkv_t
        s = decay * s + jnp.einsum("bhd,bhe->bhde", k_t, v_t)
        return s, jnp.einsum("bhd,bhde->bhe", q_t, s)

      final, o = jax.lax.scan(step, state, [jnp.swapaxes(x, 0, 1) for x in (q, k, v)])
      return jnp.swapaxes(o, 0, 1), final

    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, state)]
    _, vjp = jax.vjp(recurrence, *args)
    grads = vjp((jnp.asarray(np.asarray(d_o, np.float64)),
                 jnp.asarray(np.asarray(d_final, np.float64))))
    return [np.asarray(g) for g in grads]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vjp_matches_float64_recurrence(dtype):
  """The kernels' gradients against the recurrence in float64, T = 75 (ragged last block, 5
  segments): float32 within 1e-5, bfloat16 within 1e-2 (the module docstring's tolerances;
  float64 takes the float32 reference's own rounding out of the comparison)."""
  q, k, v, slope, state = _inputs(12, 1, 75, 16, dtype)
  keys = jax.random.split(jax.random.key(13), 2)
  d_o = jax.random.normal(keys[0], q.shape, jnp.float32).astype(dtype)
  d_final = jax.random.normal(keys[1], state.shape, jnp.float32)
  _, vjp = jax.vjp(lambda q, k, v, state: lightning_attention(
      q, k, v, slope, state, interpret=True, config=CPU_SEGMENTED), q, k, v, state)
  grads = vjp((d_o, d_final))
  grads_ref = _float64_recurrence_vjp(q, k, v, slope, state, d_o, d_final)
  for name, got, want in zip(("dq", "dk", "dv", "d initial_state"), grads, grads_ref):
    assert _rel_err(got, want) <= TOL[dtype], name


@pytest.mark.parametrize("config", [CPU_STATE_BLOCKS, CPU_PARTS, CPU_PARTS_STATE_BLOCKS],
                         ids=["state_blocks", "parts", "parts_state_blocks"])
def test_vjp_prepass_variants(config):
  _check_vjp(jnp.float32, batch=1, seq_len=75, dim=16, config=config, interpret=True)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("num_parts, first, count", [(3, 0, None), (4, 1, 2)])
def test_local_states_reference_vs_recurrent(reverse, num_parts, first, count):
  """Each part's local state is the sweep's terminal state over that part alone from zero."""
  a, b, c, slope, _ = _inputs(12, 2, 96, 8, jnp.float32)
  got = reference.lightning_local_states(b, c, slope, num_parts=num_parts, first=first,
                                         count=count, reverse=reverse)
  count = num_parts - first if count is None else count
  part_len = 96 // num_parts
  for r in range(count):
    rows = slice((first + r) * part_len, (first + r + 1) * part_len)
    _, want = reference.lightning_sweep_recurrent(a[:, rows], b[:, rows], c[:, rows], slope,
                                                  reverse=reverse)
    assert _rel_err(got[:, :, r], want) <= TOL[jnp.float32], r


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("batch, seq_len, min_programs, state_split, num_segments, num_parts",
                         [(2, 256, 24, 1, 4, 4), (1, 512, 12, 2, 4, 8),
                          (2, 192, 12, 1, 1, 1), (1, 320, 1, 1, 1, 1)])
def test_mosaic_segments_vs_recurrent(batch, seq_len, min_programs, state_split, num_segments,
                                      num_parts, reverse):
  """The Mosaic sweeps' segment split (local states of the parts before each segment, their
  weighted sum into start states, B * N sequences), here with the recurrence standing in for
  the sweep kernel and the einsum for the local-state kernel (neither has an interpreter)."""
  a, b, c, slope, start = _inputs(6, batch, seq_len, 32, jnp.float32)
  plan = kernel_module._mosaic_plan(
      batch, seq_len, len(SLOPES), 32,
      KernelConfig(min_programs=min_programs, state_split=state_split))
  assert (plan.num_segments, plan.num_parts) == (num_segments, num_parts)
  out, final, local = kernel_module._mosaic_sweep(
      a, b, c, slope, start, plan, reverse=reverse, interpret=True,
      kernel=reference.lightning_sweep_recurrent,
      local_states=reference.lightning_local_states)
  out_ref, final_ref = reference.lightning_sweep_recurrent(a, b, c, slope, start,
                                                           reverse=reverse)
  assert _rel_err(out, out_ref) <= TOL[jnp.float32]
  assert _rel_err(final, final_ref) <= TOL[jnp.float32]
  if num_segments == 1:
    assert local is None
  else:  # only the parts some segment starts from: all but the last (first) segment's
    assert local.shape[2] == num_parts - num_parts // num_segments


def test_reverse_sweep_reference_is_the_mirrored_forward():
  """lightning_sweep_recurrent(reverse=True) is the forward sweep of the time-reversed inputs
  from lambda^-1 * start (G_T = start / lambda), its final state times lambda."""
  a, b, c, slope, start = _inputs(7, 1, 9, 8, jnp.float32)
  decay = jnp.exp(-slope)[None, :, None, None]
  flip = lambda x: x[:, ::-1]
  out, final = reference.lightning_sweep_recurrent(a, b, c, slope, start, reverse=True)
  out_m, final_m = reference.lightning_attention_recurrent(flip(a), flip(b), flip(c), slope,
                                                           start / decay)
  assert _rel_err(out, flip(out_m)) <= TOL[jnp.float32]
  assert _rel_err(final, decay * final_m) <= TOL[jnp.float32]


@pytest.mark.parametrize("forward_mosaic, backward_mosaic",
                         [(True, True), (True, False), (False, True)],
                         ids=["both", "forward", "backward"])
def test_mosaic_backward_composition_vs_recurrent(monkeypatch, forward_mosaic, backward_mosaic):
  """The custom_vjp with the Mosaic path in the forward and/or the backward (three sweeps over
  4 segments, the dq sweep reusing the forward's local states when both use the Mosaic plan),
  the recurrence standing in for the Mosaic kernel: gradients of q, k, v and the initial state
  equal the recurrence's autodiff."""
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  monkeypatch.setattr(mosaic, "lightning_sweep_mosaic", reference.lightning_sweep_recurrent)
  monkeypatch.setattr(  # the kernel's tiling arguments have no meaning for the einsum
      mosaic, "lightning_local_states_mosaic",
      lambda *args, block_size, num_stages, **kwargs: reference.lightning_local_states(
          *args, **kwargs))
  batch, seq_len, dim = 2, 256, 16
  q, k, v, slope, state = _inputs(8, batch, seq_len, dim, jnp.float32)
  plan = kernel_module._plan(batch, seq_len, len(SLOPES), dim,
                             KernelConfig(block_size=32, value_tile=16, segment_len=96))
  mosaic_plan = kernel_module._mosaic_plan(batch, seq_len, len(SLOPES), dim,
                                           KernelConfig(min_programs=24))
  assert (plan.num_segments, mosaic_plan.num_segments) == (3, 4)
  keys = jax.random.split(jax.random.key(9), 2)
  d_o = jax.random.normal(keys[0], q.shape, jnp.float32)
  d_final = jax.random.normal(keys[1], state.shape, jnp.float32)

  def fn(q, k, v, state):
    return kernel_module._lightning(q, k, v, slope, state, plan,
                                    mosaic_plan if forward_mosaic else None,
                                    mosaic_plan if backward_mosaic else None, True)

  outs, vjp = jax.vjp(fn, q, k, v, state)
  outs_ref, vjp_ref = jax.vjp(
      lambda *x: reference.lightning_attention_recurrent(x[0], x[1], x[2], slope, x[3]),
      q, k, v, state)
  for got, want in zip(outs, outs_ref):
    assert _rel_err(got, want) <= TOL[jnp.float32]
  for name, got, want in zip(("dq", "dk", "dv", "d initial_state"), vjp((d_o, d_final)),
                             vjp_ref((d_o, d_final))):
    assert _rel_err(got, want) <= TOL[jnp.float32], name


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_mosaic_decay_table_drives_the_blockwise_sweep(reverse):
  """The Mosaic kernel's per-block arithmetic, written out in jnp with its decay table (rows:
  a's decay onto the state, the row and column log-decay terms, c's decay into the state,
  lambda^C), blocks in the kernel's order and its mask: equals the recurrence. The kernel itself
  has no interpreter; this pins the table and the block order it relies on."""
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  block, dim, num_blocks = 64, 16, 3
  a, b, c, slope, start = _inputs(11, 1, block * num_blocks, dim, jnp.float32)
  table = mosaic._decay_table(slope, block, dim, reverse)  # [H, 5, max(C, D)]
  i, j = np.arange(block)[:, None], np.arange(block)[None, :]
  outs, states = [None] * num_blocks, []
  for h in range(len(SLOPES)):
    row_decay, row_log, col_log, c_decay = (table[h, r, :block] for r in range(4))
    block_decay = table[h, 4, :dim]
    mask = jnp.where(j >= i if reverse else i >= j,
                     jnp.exp(jnp.minimum(row_log[:, None] + col_log[None, :], 0.0)), 0.0)
    y = start[0, h]
    per_head = [None] * num_blocks
    for n in range(num_blocks):
      blk = num_blocks - 1 - n if reverse else n
      rows = slice(blk * block, (blk + 1) * block)
      a_blk, b_blk, c_blk = a[0, rows, h], b[0, rows, h], c[0, rows, h]
      hi = jax.lax.Precision.HIGHEST
      per_head[blk] = (jnp.dot(jnp.dot(a_blk, b_blk.T, precision=hi) * mask, c_blk, precision=hi)
                       + jnp.dot(a_blk * row_decay[:, None], y, precision=hi))
      y = block_decay[:, None] * y + jnp.dot(b_blk.T, c_blk * c_decay[:, None], precision=hi)
    outs[h] = jnp.concatenate(per_head)
    states.append(y)
  out_ref, final_ref = reference.lightning_sweep_recurrent(a, b, c, slope, start,
                                                           reverse=reverse)
  assert _rel_err(jnp.stack(outs, axis=1)[None], out_ref) <= TOL[jnp.float32]
  assert _rel_err(jnp.stack(states)[None], final_ref) <= TOL[jnp.float32]


def _num_mosaic_kernels(text: str, name: str = "lightning_sweep_mosaic") -> int:
  """Calls of a jitted Mosaic kernel (identical calls share one lowered function, so its
  custom calls undercount)."""
  return text.count(f"call @{name}")


@pytest.mark.parametrize("impl", ["mosaic", "auto"])
@pytest.mark.parametrize("min_programs, num_segments", [(4, 2), (1, 1)])
def test_mosaic_forward_and_backward_lower_for_cuda(monkeypatch, min_programs, num_segments,
                                                    impl):
  """The Mosaic path lowers on CPU for CUDA, forward and reverse kernels, with no Triton kernel:
  the forward is one Mosaic GPU sweep (and one local-state kernel with segments); with
  backward_impl="mosaic" the backward adds three sweeps and one local-state kernel (dv's: dq
  reuses the forward's local states, dk dv's). "auto" takes the same path on Hopper, also
  where the Mosaic kernels split the sequence and the Triton sweep would not (min_programs 4:
  2 value tiles x 2 heads fill it)."""
  monkeypatch.setattr(kernel_module, "is_hopper", lambda: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  batch, seq_len, heads, dim = 1, 256, 2, 128
  x = jax.ShapeDtypeStruct((batch, seq_len, heads, dim), jnp.bfloat16)
  slope = jax.ShapeDtypeStruct((heads,), jnp.float32)
  state = jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)
  config = KernelConfig(min_programs=min_programs, forward_impl=impl, backward_impl=impl)
  assert kernel_module._plan(batch, seq_len, heads, dim, config).num_segments == 1
  assert kernel_module._mosaic_plan(batch, seq_len, heads, dim, config).num_segments == (
      num_segments)

  def forward(q, k, v, slope, state):
    return lightning_attention(q, k, v, slope, state, config=config)

  def fwd_bwd(q, k, v, slope, state):
    outs, vjp = jax.vjp(lambda *a: forward(*a, slope, state), q, k, v)
    return vjp(outs)

  def lowered(fn):
    return jax.jit(fn).trace(x, x, x, slope, state).lower(lowering_platforms=("cuda",)).as_text()

  prepasses = int(num_segments > 1)
  text = lowered(forward)
  assert _num_mosaic_kernels(text) == 1 and "xla.gpu.triton" not in text
  assert _num_mosaic_kernels(text, "lightning_local_states_mosaic") == prepasses
  text = lowered(fwd_bwd)
  assert _num_mosaic_kernels(text) == 4 and "xla.gpu.triton" not in text
  assert _num_mosaic_kernels(text, "lightning_local_states_mosaic") == 2 * prepasses


@pytest.mark.parametrize("dim, block_size, num_stages, reverse",
                         [(128, 64, 3, False), (128, 64, 1, True), (64, 128, 2, True),
                          (128, 128, 2, False)])
def test_mosaic_local_states_lower_for_cuda(dim, block_size, num_stages, reverse):
  """The local-state kernel lowers through Mosaic GPU on CPU for every tiling the GPU test runs
  (one and several SMEM stages, both directions, D 64 and 128)."""
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  x = jax.ShapeDtypeStruct((2, 1024, 2, dim), jnp.bfloat16)
  fn = functools.partial(mosaic.lightning_local_states_mosaic, num_parts=4, first=1, count=2,
                         reverse=reverse, block_size=block_size, num_stages=num_stages)
  lowered = jax.jit(fn).trace(x, x, jax.ShapeDtypeStruct((2,), jnp.float32)).lower(
      lowering_platforms=("cuda",))
  assert lowered.out_info.shape == (2, 2, 2, dim, dim)


def test_mosaic_local_states_reject_bad_parts():
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  x = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
  slope = jnp.ones((2,))
  with pytest.raises(ValueError, match="multiple of num_parts"):
    mosaic.lightning_local_states_mosaic(x, x, slope, num_parts=3)
  with pytest.raises(ValueError, match="first=2, count=3"):
    mosaic.lightning_local_states_mosaic(x, x, slope, num_parts=4, first=2, count=3)
  with pytest.raises(ValueError, match="shared memory"):
    mosaic.lightning_local_states_mosaic(x, x, slope, num_parts=1, block_size=128,
                                         num_stages=3)


def test_mosaic_sweep_rejects_tilings_over_shared_memory():
  """Block 128 at D = 128 fits one SMEM stage, not two (300128 bytes: what Mosaic GPU itself
  reports on an H200); the check runs before lowering, with the fix in the message."""
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  assert mosaic.smem_bytes(128, 128, 2) == 300128
  assert mosaic.smem_bytes(128, 128, 1) <= 227 * 1024 < mosaic.smem_bytes(128, 128, 2)
  x = jnp.zeros((1, 384, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"block_size=128 at D=128 with 2 stages .* num_stages=1"):
    mosaic.lightning_sweep_mosaic(x, x, x, jnp.ones((2,)), block_size=128, num_stages=2)


def test_mosaic_plan_segments():
  """Equal segments of whole 64-token blocks, as many as bring B * H up to min_programs."""
  plan = kernel_module._mosaic_plan(1, 32768, 16, 128, KernelConfig())
  assert (plan.num_segments, plan.seg_len, plan.num_parts) == (8, 4096, 8)
  plan = kernel_module._mosaic_plan(1, 15 * 64, 32, 128, KernelConfig())
  assert plan.num_segments == 3  # 15 blocks, 4 wanted: the largest divisor below is 3
  assert kernel_module._mosaic_plan(16, 2048, 16, 128, KernelConfig()).num_segments == 1
  # The local-state kernel's tiling: block 64 or 128 (else 64), its SMEM stages by default and
  # as a cap (what fits at D = 128), state_split parts per segment.
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  for fields, want in [({}, (64, 4)), (dict(state_num_stages=2), (64, 2)),
                       (dict(state_block_size=128, state_num_stages=3), (128, 2)),
                       (dict(state_block_size=256), (64, 4))]:
    plan = kernel_module._mosaic_plan(1, 32768, 16, 128, KernelConfig(**fields))
    assert (plan.state_block, plan.state_num_stages) == want, fields
    assert mosaic.local_state_smem_bytes(*want[:1], 128, want[1]) <= 227 * 1024
  assert mosaic.local_state_smem_bytes(64, 128, 5) > 227 * 1024
  assert mosaic.local_state_smem_bytes(128, 128, 3) > 227 * 1024
  plan = kernel_module._mosaic_plan(1, 32768, 16, 128, KernelConfig(state_split=2))
  assert (plan.num_segments, plan.num_parts) == (8, 16)


def test_forward_impl_selection():
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  assert not kernel_module._use_mosaic(q, KernelConfig(), interpret=True)  # auto: Triton
  with pytest.raises(ValueError, match="compiled mode"):
    kernel_module._use_mosaic(q, KernelConfig(forward_impl="mosaic"), interpret=True)
  with pytest.raises(ValueError, match="multiple of 64"):
    kernel_module._use_mosaic(q[:, :100], KernelConfig(forward_impl="mosaic"), interpret=True)
  assert not kernel_module._use_mosaic(q, KernelConfig(forward_impl="triton"), interpret=False)
  # The backward's choice by its own field, "auto" by default (Triton off Hopper), "mosaic"
  # checked the same way.
  assert KernelConfig().backward_impl == "auto"
  assert not kernel_module._use_mosaic(q, KernelConfig(), interpret=False, field="backward_impl")
  with pytest.raises(ValueError, match="backward_impl='mosaic' needs compiled mode"):
    kernel_module._use_mosaic(q, KernelConfig(backward_impl="mosaic"), interpret=True,
                              field="backward_impl")


def test_plan_parts():
  """state_split takes the largest divisor of the segment's block count, at most as asked."""
  plan = kernel_module._plan(1, 32768, 16, 128, KernelConfig(state_split=4))
  assert (plan.seg_len, plan.num_segments, plan.part_len, plan.num_parts) == (8192, 4, 2048, 16)
  plan = kernel_module._plan(1, 3 * 64 * 5, 1, 128, KernelConfig(segment_len=3 * 64 * 5,
                                                                 state_split=4))
  assert plan.part_len == 5 * 64  # 15 blocks per segment: split 3, not 4
  assert kernel_module._plan(1, 32768, 16, 128, KernelConfig()).num_parts == 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_matches_reference(dtype):
  _check_decode(dtype, batch=3, dim=32, interpret=True, value_tile=16)


def test_decode_chain_matches_forward():
  """Token-by-token decode reproduces the chunked forward's outputs and final state."""
  q, k, v, slope, state = _inputs(3, 2, 6, 16, jnp.float32)
  o_full, final_full = lightning_attention(q, k, v, slope, state, interpret=True,
                                           config=CPU_SEGMENTED)
  outs = []
  for t in range(q.shape[1]):
    o_t, state = lightning_attention_decode(q[:, t], k[:, t], v[:, t], slope, state,
                                            interpret=True)
    outs.append(o_t)
  assert _rel_err(jnp.stack(outs, axis=1), o_full) <= TOL[jnp.float32]
  assert _rel_err(state, final_full) <= TOL[jnp.float32]


@pytest.mark.parametrize("case", ["shape", "dtype", "dim", "slope", "state", "block", "split",
                                  "stages", "forward_impl", "backward_impl"])
def test_bad_inputs_raise(case):
  q, k, v, slope, state = _inputs(4, 1, 8, 16, jnp.float32)
  config = CPU_SEGMENTED
  if case == "shape":
    k = k[:, :4]
  elif case == "dtype":
    v = v.astype(jnp.bfloat16)
  elif case == "dim":
    q, k, v = (x[..., :12] for x in (q, k, v))
  elif case == "slope":
    slope = slope[:2]
  elif case == "state":
    state = state[:, :, :8]
  elif case == "block":
    config = KernelConfig(block_size=24)
  elif case == "split":
    config = KernelConfig(state_split=0)
  elif case == "stages":
    config = KernelConfig(state_num_stages=0)
  elif case == "forward_impl":
    config = KernelConfig(forward_impl="cuda")
  else:
    config = KernelConfig(backward_impl="fla")
  with pytest.raises(ValueError):
    lightning_attention(q, k, v, slope, state, interpret=True, config=config)


def test_compiled_mode_needs_gpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  q, k, v, slope, state = _inputs(5, 1, 8, 16, jnp.float32)
  with pytest.raises(ValueError, match="interpret"):
    lightning_attention(q, k, v, slope, state)
  with pytest.raises(ValueError, match="interpret"):
    lightning_attention_decode(q[:, 0], k[:, 0], v[:, 0], slope, state)


def test_lowers_to_triton_for_cuda(monkeypatch):
  """The forward (2 kernels), backward (4 more) and decode (1) lower to Triton custom calls."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  batch, seq_len, heads, dim = 2, 1000, 4, 128
  x = jax.ShapeDtypeStruct((batch, seq_len, heads, dim), jnp.bfloat16)
  slope = jax.ShapeDtypeStruct((heads,), jnp.float32)
  state = jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)

  def fwd_bwd(q, k, v, slope, state):
    outs, vjp = jax.vjp(lambda *a: lightning_attention(*a, slope, state), q, k, v)
    return vjp(outs)

  def num_triton_calls(fn, *args):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("xla.gpu.triton")

  assert num_triton_calls(fwd_bwd, x, x, x, slope, state) == 6
  token = jax.ShapeDtypeStruct((batch, heads, dim), jnp.bfloat16)
  assert num_triton_calls(lightning_attention_decode, token, token, token, slope, state) == 1
  states = jax.ShapeDtypeStruct((14,) + state.shape, jnp.float32)
  layer = jax.ShapeDtypeStruct((), jnp.int32)
  assert num_triton_calls(lightning_attention_decode, token, token, token, slope, states,
                          layer) == 1



def test_auto_decode_takes_the_kernel_unless_the_stack_is_too_large(monkeypatch):
  """On a GPU "auto" decodes through the kernel; a stack with more elements than the kernel's
  32-bit offsets address goes through the jnp step instead of failing (traced, not allocated)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  batch, heads, dim = 4, 8, 128
  token = jax.ShapeDtypeStruct((batch, heads, dim), jnp.bfloat16)
  slope = jax.ShapeDtypeStruct((heads,), jnp.float32)
  layer = jax.ShapeDtypeStruct((), jnp.int32)
  per_row = batch * heads * dim * dim
  rows_that_fit = kernel_module.MAX_DECODE_STATE_ELEMENTS // per_row

  def uses_kernel(rows, impl="auto"):
    states = jax.ShapeDtypeStruct((rows, batch, heads, dim, dim), jnp.float32)
    fn = functools.partial(lightning_attention_decode, impl=impl)
    return "pallas_call" in str(jax.make_jaxpr(fn)(token, token, token, slope, states, layer))

  assert uses_kernel(rows_that_fit)
  assert not uses_kernel(rows_that_fit + 1)
  assert not uses_kernel(rows_that_fit, impl="blockwise")
  with pytest.raises(ValueError, match="more than the decode kernel addresses"):
    uses_kernel(rows_that_fit + 1, impl="pallas")

GPU_CONFIGS = [KernelConfig(), KernelConfig(block_size=64, value_tile=64, segment_len=128,
                                            state_block_size=128),
               KernelConfig(block_size=128, value_tile=128, num_warps=8, num_stages=2,
                            segment_len=1 << 20),
               KernelConfig(segment_len=256, state_split=2, state_block_size=128,
                            state_num_stages=3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_forward_matches_recurrent(dtype, dim):
  _check_forward(dtype, batch=2, seq_len=300, dim=dim, config=GPU_CONFIGS[0], interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("config, dtype", [(GPU_CONFIGS[1], jnp.float32),
                                           (GPU_CONFIGS[1], jnp.bfloat16),
                                           (GPU_CONFIGS[2], jnp.bfloat16),
                                           (GPU_CONFIGS[3], jnp.bfloat16)],
                         ids=["segments-float32", "segments-bfloat16", "one-bfloat16",
                              "parts-bfloat16"])
def test_gpu_forward_other_tilings(config, dtype):
  # The 128 x 128 tiling holds bf16 blocks only: float32 ones exceed the H200's shared memory.
  _check_forward(dtype, batch=2, seq_len=300, dim=128, config=config, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_vjp_matches_recurrent(dtype, dim):
  _check_vjp(dtype, batch=2, seq_len=300, dim=dim, config=GPU_CONFIGS[0], interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS[1:], ids=["segments", "one", "parts"])
def test_gpu_vjp_other_tilings(config):
  _check_vjp(jnp.bfloat16, batch=2, seq_len=300, dim=128, config=config, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_decode_matches_reference(dtype, dim):
  _check_decode(dtype, batch=5, dim=dim, interpret=False, value_tile=64)


requires_hopper = pytest.mark.skipif(not kernel_module.is_hopper(),
                                     reason="the Mosaic GPU kernel needs compute capability 9.x")

MOSAIC_CONFIGS = [KernelConfig(forward_impl="mosaic"),  # B * H = 6: 5 segments of 64 tokens
                  KernelConfig(forward_impl="mosaic", min_programs=1)]  # one segment


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("config", MOSAIC_CONFIGS, ids=["segments", "one"])
def test_gpu_mosaic_forward_matches_recurrent(dim, config):
  _check_forward(jnp.bfloat16, batch=2, seq_len=320, dim=dim, config=config, interpret=False)
  q = jnp.zeros((2, 320, len(SLOPES), dim), jnp.bfloat16)
  assert kernel_module._use_mosaic(q, KernelConfig(), interpret=False)  # "auto" picks it


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dim, block_size, num_stages", [(64, 64, 2), (128, 64, 2),
                                                        (128, 128, 1)])
def test_gpu_mosaic_sweep_matches_recurrent(reverse, dim, block_size, num_stages):
  """The Mosaic kernel alone, both directions, with a start state: 3 blocks of 128 or 6 of 64
  (more blocks than SMEM stages)."""
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  a, b, c, slope, start = _inputs(10, 2, 384, dim, jnp.bfloat16)
  out, final = mosaic.lightning_sweep_mosaic(a, b, c, slope, start, reverse=reverse,
                                             block_size=block_size, num_stages=num_stages)
  out_ref, final_ref = reference.lightning_sweep_recurrent(a, b, c, slope, start,
                                                           reverse=reverse)
  assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
  assert _rel_err(out, out_ref) <= TOL[jnp.bfloat16]
  assert _rel_err(final, final_ref) <= TOL[jnp.bfloat16]


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dim, block_size, num_stages", [(64, 64, 2), (128, 64, 3),
                                                        (128, 64, 1), (128, 128, 2)])
def test_gpu_mosaic_local_states_match_reference(reverse, dim, block_size, num_stages):
  """The local-state kernel on parts 1 and 2 of 4 (8 blocks of 64 or 4 of 128 each, more than
  the SMEM stages) against the float32 einsum."""
  mosaic = importlib.import_module("pallas_kernels.lightning.mosaic")
  _, b, c, slope, _ = _inputs(13, 2, 2048, dim, jnp.bfloat16)
  got = mosaic.lightning_local_states_mosaic(b, c, slope, num_parts=4, first=1, count=2,
                                             reverse=reverse, block_size=block_size,
                                             num_stages=num_stages)
  want = reference.lightning_local_states(b, c, slope, num_parts=4, first=1, count=2,
                                          reverse=reverse)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert _rel_err(got, want) <= TOL[jnp.bfloat16]


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("backward_impl", ["triton", "mosaic"])
@pytest.mark.parametrize("config", MOSAIC_CONFIGS, ids=["segments", "one"])
def test_gpu_vjp_after_mosaic_forward(config, backward_impl):
  config = dataclasses.replace(config, backward_impl=backward_impl)
  _check_vjp(jnp.bfloat16, batch=2, seq_len=320, dim=128, config=config, interpret=False)


@pytest.mark.gpu
@requires_hopper
def test_gpu_mosaic_backward_at_d64():
  config = KernelConfig(forward_impl="mosaic", backward_impl="mosaic")
  _check_vjp(jnp.bfloat16, batch=2, seq_len=320, dim=64, config=config, interpret=False)
