"""The three jnp lightning-attention implementations compute one function (and one gradient).

All arithmetic is float32 on random (never zero) inputs; implementations differ only in summation
order, so outputs, states and gradients agree to <= 2e-5 relative to the largest magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.model.lightning import decay_slopes
from pallas_kernels import lightning_attention
from pallas_kernels.lightning import reference as ops

RTOL = 2e-5


def _inputs(seed, b, t, h, d, slope_scale=1.0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(ks[i], (b, t, h, d), jnp.float32) for i in range(3))
  state = jax.random.normal(ks[3], (b, h, d, d), jnp.float32)
  slope = decay_slopes(h, 1, 4) * slope_scale
  return q, k, v, slope, state


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


IMPLS = {
    "quadratic": ops.lightning_attention_quadratic,
    "blockwise_8": lambda *a: ops.lightning_attention_blockwise(*a, block_size=8),
    "blockwise_16": lambda *a: ops.lightning_attention_blockwise(*a, block_size=16),
    "blockwise_whole": lambda *a: ops.lightning_attention_blockwise(*a, block_size=1024),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("t, slope_scale, with_state", [
    (37, 1.0, True),  # 37: not a multiple of any block size
    (37, 1e-4, False),  # slopes * 1e-4: decays within 1e-4 of 1
    (8, 1.0, False),
    (1, 1.0, True),
])
def test_forward_and_state_match_recurrence(impl, t, slope_scale, with_state):
  q, k, v, slope, state = _inputs(0, 2, t, 4, 8, slope_scale)
  state = state if with_state else None
  o_ref, s_ref = ops.lightning_attention_recurrent(q, k, v, slope, state)
  o, s = IMPLS[impl](q, k, v, slope, state)
  assert o.dtype == q.dtype and s.dtype == jnp.float32 and s.shape == (2, 4, 8, 8)
  assert _rel(o, o_ref) <= RTOL
  assert _rel(s, s_ref) <= RTOL


def test_strong_decay_heads():
  """Slopes up to 8 (lambda = 3e-4): the first-block tokens must vanish from later states."""
  q, k, v, _, state = _inputs(1, 1, 40, 2, 8)
  slope = jnp.array([8.0, 0.5], jnp.float32)
  o_ref, s_ref = ops.lightning_attention_recurrent(q, k, v, slope, state)
  o, s = ops.lightning_attention_blockwise(q, k, v, slope, state, block_size=16)
  assert _rel(o, o_ref) <= RTOL and _rel(s, s_ref) <= RTOL
  assert np.all(np.isfinite(np.asarray(s)))


@pytest.mark.parametrize("impl", ["quadratic", "blockwise_8"])
def test_gradients_match_recurrence(impl):
  q, k, v, slope, state = _inputs(2, 2, 21, 2, 8)
  cotangent_o = jax.random.normal(jax.random.key(9), q.shape)
  cotangent_s = jax.random.normal(jax.random.key(10), state.shape)

  def loss(fn, q, k, v, s0):
    o, s = fn(q, k, v, slope, s0)
    return jnp.sum(o * cotangent_o) + jnp.sum(s * cotangent_s)

  ref = jax.grad(lambda *a: loss(ops.lightning_attention_recurrent, *a), argnums=(0, 1, 2, 3))(
      q, k, v, state)
  got = jax.grad(lambda *a: loss(IMPLS[impl], *a), argnums=(0, 1, 2, 3))(q, k, v, state)
  for g, r in zip(got, ref):
    assert _rel(g, r) <= RTOL


def test_bf16_inputs_return_bf16_with_float32_state():
  q, k, v, slope, _ = _inputs(3, 1, 19, 2, 8)
  o, s = ops.lightning_attention_blockwise(*(x.astype(jnp.bfloat16) for x in (q, k, v)), slope,
                                           block_size=8)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32


def test_decode_step_continues_a_prefill():
  q, k, v, slope, state = _inputs(4, 2, 12, 2, 8)
  o_ref, s_ref = ops.lightning_attention_recurrent(q, k, v, slope, state)
  _, s = ops.lightning_attention_blockwise(q[:, :11], k[:, :11], v[:, :11], slope, state,
                                           block_size=4)
  o_last, s = ops.lightning_decode_step(q[:, 11], k[:, 11], v[:, 11], slope, s)
  assert _rel(o_last, o_ref[:, 11]) <= RTOL and _rel(s, s_ref) <= RTOL


def test_bad_shapes_raise():
  q, k, v, slope, state = _inputs(5, 1, 4, 2, 8)
  with pytest.raises(ValueError, match="slope must be"):
    ops.lightning_attention_blockwise(q, k, v, slope[:1])
  with pytest.raises(ValueError, match="initial_state must be"):
    ops.lightning_attention_recurrent(q, k, v, slope, state[:, :1])
  with pytest.raises(ValueError, match="implementation 'cuda'"):
    lightning_attention(q, k, v, slope, impl="cuda")
