"""The grouped matmul (pallas_kernels.grouped_matmul) vs a dense per-row reference.

CPU: the XLA path and the custom_vjp's gradient plumbing (with XLA kernels standing in for the
Mosaic ones, which have no interpreter), float32: the paths differ in summation order only, so
1e-5 relative. The Mosaic kernels lower for CUDA on CPU. GPU (Hopper): the Mosaic kernels, bf16
operands and outputs: each product is rounded to bf16 once (2^-9 relative), so 1e-2 relative.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import mosaic, ops, reference
from pallas_kernels.platform import is_hopper

F32_TOL, BF16_TOL = 1e-5, 1e-2


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got))
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _sizes(case: str, rows: int, groups: int, seed: int):
  """Group sizes summing to `rows`: random with some empty groups, or one group taking all."""
  rng = np.random.default_rng(seed)
  if case == "one_group":
    sizes = np.zeros(groups, np.int32)
    sizes[groups // 2] = rows
    return sizes
  weights = rng.random(groups) * (rng.random(groups) > 0.3)  # ~30% empty groups
  weights[0] = 0.0  # the first group empty too (a boundary case of the kernels' tiling)
  cuts = np.floor(np.cumsum(weights) / weights.sum() * rows).astype(np.int64)
  return np.diff(np.concatenate([[0], cuts])).astype(np.int32)


def _inputs(rows, k, n, groups, dtype, case, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (rows, k), jnp.float32).astype(dtype)
  rhs = (jax.random.normal(keys[1], (groups, k, n), jnp.float32) * k ** -0.5).astype(dtype)
  d_out = jax.random.normal(keys[2], (rows, n), jnp.float32).astype(dtype)
  return lhs, rhs, jnp.asarray(_sizes(case, rows, groups, seed)), d_out


def _value_and_grads(fn, lhs, rhs, sizes, d_out):
  out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
  return (out, *vjp(d_out))


@pytest.mark.parametrize("case", ["random", "one_group"])
def test_xla_path_and_custom_vjp_vs_dense(case):
  lhs, rhs, sizes, d_out = _inputs(70, 24, 40, 6, jnp.float32, case)
  assert int(sizes.sum()) == 70 and (case == "one_group" or (np.asarray(sizes) == 0).any())
  want = _value_and_grads(reference.grouped_matmul_dense, lhs, rhs, sizes, d_out)
  xla = _value_and_grads(lambda a, b, s: ops.grouped_matmul(a, b, s, impl="xla"), lhs, rhs,
                         sizes, d_out)
  plumbed = _value_and_grads(  # the aligned layout with tiles of 8 rows, on the XLA kernels
      lambda a, b, s: ops.grouped_matmul_custom_vjp(a, b, s, ops.XLA_KERNELS, 8), lhs, rhs, sizes,
      d_out)
  for got in (xla, plumbed):
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
      assert _rel(g, w) <= F32_TOL, name


def test_aligned_rows_start_every_group_at_a_tile():
  sizes = jnp.array([0, 3, 8, 0, 1], jnp.int32)
  padded, dest = ops.aligned_rows(sizes, 12, 8)
  np.testing.assert_array_equal(padded, [0, 8, 8, 0, 8])
  np.testing.assert_array_equal(dest, [0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16])


def test_auto_picks_mosaic_only_on_hopper_and_mosaic_says_why():
  shapes = ((64, 128), (4, 128, 256))
  expected = "mosaic" if is_hopper() else "xla"
  assert ops.resolve_impl("auto", *shapes, jnp.bfloat16) == expected
  assert ops.resolve_impl("auto", *shapes, jnp.float32) == "xla"  # 16-bit operands only
  with pytest.raises(ValueError, match="16-bit operands"):
    ops.resolve_impl("mosaic", *shapes, jnp.float32)
  if not is_hopper():
    with pytest.raises(ValueError, match="compute capability 9"):
      ops.resolve_impl("mosaic", *shapes, jnp.bfloat16)
  with pytest.raises(ValueError, match="implementation 'cuda'"):
    ops.resolve_impl("cuda", (64, 128), (4, 128, 256), jnp.bfloat16)


def test_tilings():
  """The measured tilings for the small preset's shapes, and None where the kernels cannot go."""
  assert mosaic.forward_tiling(1024, 1536) == mosaic.Tiling(128, 192, 64, 4, 1)  # [w1 | w3]
  assert mosaic.forward_tiling(768, 1024) == mosaic.Tiling(128, 128, 64, 4, 4)  # w2
  assert mosaic.weight_grad_tiling(1024, 1536).grid_block_n == 2
  assert mosaic.forward_tiling(100, 1024) is None and mosaic.forward_tiling(64, 100) is None
  assert mosaic.weight_grad_tiling(192, 1024) is None
  assert "multiples of 128" in " ".join(mosaic.unmet((8, 64), (2, 64, 64), jnp.bfloat16))


@pytest.mark.parametrize("rows", [512, 2])
def test_mosaic_kernels_lower_for_cuda(monkeypatch, rows):
  """Forward, input gradient and weight gradient lower on CPU to Mosaic GPU custom calls; also
  for 2 rows (a batch-1 decode step, top-2), whose aligned layout must still be a whole number
  of tiles (TMA rejects 2 + 4 x 128 rows)."""
  # The weight-gradient kernel asks the default device for its SM count.
  fake_jax = types.SimpleNamespace(**{k: getattr(jax, k) for k in dir(jax) if not k.startswith("_")})
  fake_jax.devices = lambda: [types.SimpleNamespace(core_count=132)]
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", fake_jax)
  k, n, groups = 256, 384, 4
  lhs = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
  rhs = jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)

  def fwd_bwd(a, b, s):
    out, vjp = jax.vjp(
        lambda a, b: ops.grouped_matmul_custom_vjp(a, b, s, ops.MOSAIC_KERNELS, 128), a, b)
    return out, vjp(out)

  def lowered(fn):
    return jax.jit(fn).trace(lhs, rhs, sizes).lower(lowering_platforms=("cuda",)).as_text()

  kernels = lowered(fwd_bwd).count("custom_call @mosaic_gpu")
  assert kernels == 3, kernels
  # Every MoE layer calls the same kernels on the same shapes: they are lowered once (each
  # Mosaic GPU lowering takes a fraction of a second; the train step had 48 of 6 kernels).
  twice = lambda a, b, s: (fwd_bwd(a, b, s), fwd_bwd(a * 2, b, s))
  assert lowered(twice).count("custom_call @mosaic_gpu") == kernels


GPU_SHAPES = [(32768, 1024, 1536, 16), (32768, 768, 1024, 16), (512, 1024, 1536, 16),
              (96, 768, 1024, 32), (2, 1024, 768, 16)]


@pytest.mark.gpu
@pytest.mark.skipif(not is_hopper(), reason="the Mosaic kernels need compute capability 9.x")
@pytest.mark.parametrize("case", ["random", "one_group"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["w13", "w2", "decode-w13", "decode-w2",
                                                 "batch1-w1"])
def test_gpu_mosaic_vs_dense(shape, case):
  rows, k, n, groups = shape
  lhs, rhs, sizes, d_out = _inputs(rows, k, n, groups, jnp.bfloat16, case, seed=rows)
  assert ops.resolve_impl("auto", lhs.shape, rhs.shape, lhs.dtype) == "mosaic"
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(reference.grouped_matmul_dense,
                            *(x.astype(jnp.float32) for x in (lhs, rhs)), sizes,
                            d_out.astype(jnp.float32))
  got = jax.jit(lambda a, b, s, d: _value_and_grads(
      lambda a, b, s: ops.grouped_matmul(a, b, s, impl="mosaic"), a, b, s, d))(lhs, rhs, sizes,
                                                                              d_out)
  for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
    assert g.dtype == jnp.bfloat16, name
    assert _rel(g, w) <= BF16_TOL, name
