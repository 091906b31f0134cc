"""Lightning attention (decayed linear attention, no normaliser) in pure jnp: the references.

Per head h with decay lambda_h = exp(-slope_h), and a state that includes the current token:

    S_t = lambda_h * S_{t-1} + k_t^T v_t        (S: [D, D], float32)
    o_t = q_t S_t

Three jnp implementations compute this function (`pallas_kernels.lightning_attention` picks one,
or the Pallas kernel, by name):
  * `lightning_attention_recurrent`: token by token (lax.scan), the ground truth.
  * `lightning_attention_quadratic`: the masked decay matrix, O(T^2) memory.
  * `lightning_attention_blockwise`: blocks of C tokens (lax.scan over blocks carrying the state):
    intra-block [(Q K^T) * M] V with M_ij = lambda^(i-j) (i >= j), inter-block (Q * lambda^(i+1)) S,
    update S <- lambda^m S + (K * lambda^(m-j-1))^T V for a block of m tokens.
All take q, k, v [B, T, H, D], slope [H] and an optional initial state [B, H, D, D]; they return
o [B, T, H, D] in q.dtype and the final state [B, H, D, D] in float32. Arithmetic is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def _check_inputs(q, k, v, slope, initial_state):
  if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"q, k, v must all be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, _, h, d = q.shape
  if slope.shape != (h,):
    raise ValueError(f"slope must be [H]=[{h}]; got {slope.shape}")
  if initial_state is not None and initial_state.shape != (b, h, d, d):
    raise ValueError(f"initial_state must be [B, H, D, D]={[b, h, d, d]}; "
                     f"got {initial_state.shape}")


def _zero_state(q):
  b, _, h, d = q.shape
  return jnp.zeros((b, h, d, d), jnp.float32)


def lightning_attention_recurrent(q, k, v, slope, initial_state=None):
  """Token-by-token recurrence.

  q, k, v [B, T, H, D]; slope [H] -> (o [B, T, H, D], S [B, H, D, D]).
  """
  _check_inputs(q, k, v, slope, initial_state)
  state = _zero_state(q) if initial_state is None else initial_state.astype(jnp.float32)
  decay = jnp.exp(-slope.astype(jnp.float32))[None, :, None, None]  # [1, H, 1, 1]

  def step(s, qkv_t):
    q_t, k_t, v_t = qkv_t  # [B, H, D] each
    s = decay * s + jnp.einsum("bhd,bhe->bhde", k_t, v_t, precision=_HI)
    return s, jnp.einsum("bhd,bhde->bhe", q_t, s, precision=_HI)

  time_major = [jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (q, k, v)]
  state, o = jax.lax.scan(step, state, time_major)
  return jnp.swapaxes(o, 0, 1).astype(q.dtype), state


def lightning_sweep_recurrent(a, b, c, slope, start=None, *, reverse: bool = False):
  """One sweep of the kernels' decayed recurrence, token by token (the ground truth of
  `pallas_kernels.lightning.kernel`'s sweeps): forward X_t = lambda X_{t-1} + b_t^T c_t,
  out_t = a_t X_t from X_{-1} = start, returning X_{T-1}; reverse G_t = lambda G_{t+1} +
  b_t^T c_t, out_t = a_t G_t from lambda G_T = start, returning lambda G_0.

  a, b, c [B, T, H, D]; slope [H]; start [B, H, D, D] or None -> (out [B, T, H, D] in a.dtype,
  final state [B, H, D, D] float32). reverse=False is `lightning_attention_recurrent`.
  """
  if not reverse:
    return lightning_attention_recurrent(a, b, c, slope, start)
  _check_inputs(a, b, c, slope, start)
  carried = _zero_state(a) if start is None else start.astype(jnp.float32)  # lambda G_{t+1}
  decay = jnp.exp(-slope.astype(jnp.float32))[None, :, None, None]

  def step(carried, abc_t):
    a_t, b_t, c_t = abc_t
    g = carried + jnp.einsum("bhd,bhe->bhde", b_t, c_t, precision=_HI)
    return decay * g, jnp.einsum("bhd,bhde->bhe", a_t, g, precision=_HI)

  time_major = [jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (a, b, c)]
  carried, out = jax.lax.scan(step, carried, time_major, reverse=True)
  return jnp.swapaxes(out, 0, 1).astype(a.dtype), carried


def lightning_local_states(b, c, slope, *, num_parts: int, first: int = 0,
                           count: int | None = None, reverse: bool = False):
  """Local states of equal parts of a sweep from a zero start, in one einsum (the reference of
  `mosaic.lightning_local_states_mosaic`): the sequence cut into num_parts parts of P tokens,
  part r's state is forward sum_t lambda^((r+1) P - 1 - t) b_t^T c_t, reverse
  sum_t lambda^(t - r P + 1) b_t^T c_t, for parts first .. first + count - 1.

  b, c [B, T, H, D] (T a multiple of num_parts); slope [H] -> [B, H, count, D, D] float32.
  """
  batch, seq_len, heads, dim = b.shape
  part_len = seq_len // num_parts
  count = num_parts - first if count is None else count
  parts = lambda x: x.astype(jnp.float32).reshape(batch, num_parts, part_len, heads, dim)[
      :, first:first + count]
  pos = jnp.arange(part_len, dtype=jnp.float32)
  exponent = pos + 1 if reverse else part_len - 1 - pos
  weight = jnp.exp(-slope.astype(jnp.float32)[:, None] * exponent[None, :])  # [H, P]
  return jnp.einsum("brthd,ht,brthe->bhrde", parts(b), weight, parts(c), precision=_HI)


def lightning_attention_quadratic(q, k, v, slope, initial_state=None):
  """Masked decay matrix form, O(T^2) memory. Same signature as the recurrent reference."""
  _check_inputs(q, k, v, slope, initial_state)
  t = q.shape[1]
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  slope = slope.astype(jnp.float32)
  idx = jnp.arange(t, dtype=jnp.float32)
  gap = idx[:, None] - idx[None, :]  # i - j
  # [H, T, T]
  mask = jnp.where(gap >= 0, jnp.exp(-slope[:, None, None] * jnp.maximum(gap, 0.0)), 0.0)
  scores = jnp.einsum("bihd,bjhd->bhij", qf, kf, precision=_HI) * mask
  o = jnp.einsum("bhij,bjhd->bihd", scores, vf, precision=_HI)
  key_decay = jnp.exp(-slope[None, :] * (t - 1 - idx)[:, None])  # [T, H]: lambda^(T-1-j)
  state = jnp.einsum("bjhd,bjhe->bhde", kf * key_decay[None, :, :, None], vf, precision=_HI)
  if initial_state is not None:
    s0 = initial_state.astype(jnp.float32)
    query_decay = jnp.exp(-slope[None, :] * (idx + 1)[:, None])  # [T, H]: lambda^(i+1)
    o = o + jnp.einsum("bihd,bhde->bihe", qf * query_decay[None, :, :, None], s0, precision=_HI)
    state = state + jnp.exp(-slope * t)[None, :, None, None] * s0
  return o.astype(q.dtype), state


def lightning_attention_blockwise(q, k, v, slope, initial_state=None, *, block_size: int = 256):
  """Blockwise form: lax.scan over blocks of `block_size` tokens carrying the float32 state.

  q, k, v [B, T, H, D] (any T; the last block may be partial); slope [H];
  initial_state [B, H, D, D] or None -> (o [B, T, H, D] in q.dtype, state [B, H, D, D] float32).
  """
  _check_inputs(q, k, v, slope, initial_state)
  if block_size <= 0:
    raise ValueError(f"block_size must be positive; got {block_size}")
  b, t, h, d = q.shape
  c = min(block_size, t)
  n = -(-t // c)
  pad = n * c - t
  state = _zero_state(q) if initial_state is None else initial_state.astype(jnp.float32)
  slope = slope.astype(jnp.float32)

  def blocks(x):  # [B, T, H, D] -> [N, B, C, H, D], zero-padded at the end.
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(b, n, c, h, d), 1, 0)

  pos = jnp.arange(c, dtype=jnp.float32)
  gap = pos[:, None] - pos[None, :]
  # [H, C, C]
  intra_mask = jnp.where(gap >= 0, jnp.exp(-slope[:, None, None] * jnp.maximum(gap, 0.0)), 0.0)
  query_decay = jnp.exp(-slope[None, :] * (pos + 1)[:, None])  # [C, H]
  block_lengths = jnp.minimum(c, t - c * jnp.arange(n)).astype(jnp.float32)  # [N]

  def step(s, xs):
    q_b, k_b, v_b, m = xs  # [B, C, H, D] x3, scalar block length
    scores = jnp.einsum("bihd,bjhd->bhij", q_b, k_b, precision=_HI) * intra_mask
    o_b = jnp.einsum("bhij,bjhd->bihd", scores, v_b, precision=_HI)
    o_b += jnp.einsum("bihd,bhde->bihe", q_b * query_decay[None, :, :, None], s, precision=_HI)
    # Keys past the block's end are zero padding; their decay exponent is clamped to stay finite.
    key_decay = jnp.exp(-slope[None, :] * jnp.maximum(m - 1 - pos, 0.0)[:, None])  # [C, H]
    s = jnp.exp(-slope * m)[None, :, None, None] * s + jnp.einsum(
        "bjhd,bjhe->bhde", k_b * key_decay[None, :, :, None], v_b, precision=_HI)
    return s, o_b

  state, o = jax.lax.scan(step, state, (blocks(q), blocks(k), blocks(v), block_lengths))
  o = jnp.moveaxis(o, 0, 1).reshape(b, n * c, h, d)[:, :t]
  return o.astype(q.dtype), state


def lightning_decode_step(q, k, v, slope, state):
  """One token. q, k, v [B, H, D]; state [B, H, D, D] -> (o [B, H, D] in q.dtype, new state)."""
  decay = jnp.exp(-slope.astype(jnp.float32))[None, :, None, None]
  state = decay * state.astype(jnp.float32) + jnp.einsum(
      "bhd,bhe->bhde", k.astype(jnp.float32), v.astype(jnp.float32), precision=_HI)
  o = jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), state, precision=_HI)
  return o.astype(q.dtype), state
