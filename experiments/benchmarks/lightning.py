"""Benchmark of the lightning attention kernels against fla (Triton), XLA and cuDNN attention.

Used by experiments/bench_lightning.py; everything here runs in one process on one GPU. JAX
timings: median over `reps` samples, each sample the mean of `inner` back-to-back calls ended
by one block_until_ready (so host dispatch overlaps device work, as in a training step). Torch
timings: triton.testing.do_bench(return_mode="median").

Row.rel_err is ||ours - other|| / ||other||: on a Pallas row against the float32 jnp reference
(XLA blockwise for prefill, the jnp step for decode), on another row between ours and that row's
implementation (fla: max over o and final state, or over dq, dk, dv; pallas-triton: o;
pallas-triton-bwd: dq, dk, dv).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import reporting
from m1jax.flops import lightning_attention_flops as lightning_flops
from m1jax.flops import softmax_attention_flops as softmax_flops
from m1jax.model.lightning import decay_slopes
from pallas_kernels import KernelConfig, lightning_attention, lightning_attention_decode
from pallas_kernels.lightning import reference

FLA_CHUNK = 64  # fla's chunk size for chunk_simple_gla


@dataclasses.dataclass
class Row:
  """One timed case."""
  kind: str  # "fwd", "fwd+bwd", "decode"
  impl: str
  batch: int
  seq_len: int
  heads: int
  dim: int
  ms: float
  tflops: float = float("nan")
  frac_peak: float = float("nan")
  frac_hbm: float = float("nan")
  fla_over_ours: float = float("nan")
  rel_err: float = float("nan")
  note: str = ""


def hbm_floor_bytes(kind: str, batch: int, seq_len: int, heads: int, dim: int) -> float:
  """Fewest bytes (bf16): forward reads q, k, v and writes o (8 D per token per head); the
  backward pass also reads q, k, v, do and writes dq, dk, dv (14 D more)."""
  per_token = {"fwd": 8, "fwd+bwd": 22}[kind] * dim
  return float(per_token * batch * seq_len * heads)


def decode_bytes(batch: int, heads: int, dim: int) -> float:
  """A decode step reads and writes the float32 state and moves q, k, v, o (bf16)."""
  return float(batch * heads * (2 * 4 * dim * dim + 4 * 2 * dim))


def rel_err(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def time_jax(fn: Callable[..., Any], *args, reps: int = 15, budget_s: float = 0.03) -> float:
  """Median milliseconds per call of a jitted fn (compiles and warms up first)."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  inner = int(max(1, min(50, budget_s / max(once, 1e-6))))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / inner)
  return 1e3 * statistics.median(samples)


def time_jax_decode(step: Callable[..., Any], q, k, v, slope, state, reps: int = 15,
                    inner: int = 20) -> float:
  """Median milliseconds per decode step; `step` donates the state, which is carried."""
  for _ in range(3):
    _, state = step(q, k, v, slope, state)
  jax.block_until_ready(state)
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(inner):
      _, state = step(q, k, v, slope, state)
    jax.block_until_ready(state)
    samples.append((time.perf_counter() - start) / inner)
  return 1e3 * statistics.median(samples)


def time_torch(fn: Callable[[], Any]) -> float:
  import triton.testing  # pylint: disable=g-import-not-at-top
  fn()
  return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def to_torch(x):
  """A jax GPU array as a torch CUDA tensor of the same dtype (zero-copy through DLPack)."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_dlpack(x)


def to_jax(t):
  return jnp.from_dlpack(t.contiguous())


def slopes(heads: int) -> jax.Array:
  """The decay slopes of MiniMax-M1's first layer (the widest range of decays)."""
  return decay_slopes(heads, 0, 80)


def make_inputs(seed: int, batch: int, seq_len: int, heads: int, dim: int, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, seq_len, heads, dim)
  q, k, v, do = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  scale = dim ** -0.25
  return (q * scale).astype(dtype), (k * scale).astype(dtype), v, do


def ours_fns(config: KernelConfig):
  fwd = jax.jit(lambda q, k, v, slope: lightning_attention(q, k, v, slope, config=config))

  def fwd_bwd(q, k, v, slope, do):
    o, vjp = jax.vjp(lambda q, k, v: lightning_attention(q, k, v, slope, config=config)[0],
                     q, k, v)
    return o, *vjp(do)  # o is returned so that the forward kernel is not dead code

  return fwd, jax.jit(fwd_bwd)


def xla_fns(block_size: int = 256):
  def run(q, k, v, slope):
    return reference.lightning_attention_blockwise(q, k, v, slope, block_size=block_size)

  def fwd_bwd(q, k, v, slope, do):
    o, vjp = jax.vjp(lambda q, k, v: run(q, k, v, slope)[0], q, k, v)
    return o, *vjp(do)

  return jax.jit(run), jax.jit(fwd_bwd)


def cudnn_fns():
  def run(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

  def fwd_bwd(q, k, v, do):
    o, vjp = jax.vjp(run, q, k, v)
    return o, *vjp(do)

  return jax.jit(run), jax.jit(fwd_bwd)


def fla_fns(q, k, v, slope, do):
  """fla chunk_simple_gla closures on torch views of the same inputs (no state in, state out)."""
  import torch  # pylint: disable=g-import-not-at-top
  from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=g-import-not-at-top
  tq, tk, tv, tdo = (to_torch(x) for x in (q, k, v, do))
  g_gamma = -to_torch(slope).float()
  leaves = [t.detach().clone().requires_grad_(True) for t in (tq, tk, tv)]

  def fwd():
    with torch.no_grad():
      return chunk_simple_gla(tq, tk, tv, g_gamma=g_gamma, scale=1.0, output_final_state=True)

  def fwd_bwd():
    o, _ = chunk_simple_gla(*leaves, g_gamma=g_gamma, scale=1.0)
    return torch.autograd.grad(o, leaves, tdo)

  return fwd, fwd_bwd


def sweep(configs: list[KernelConfig], shapes: list[tuple[int, int, int, int]],
          log: Callable[[str], None]) -> dict[KernelConfig, float]:
  """Forward and forward + backward time of each config on each (B, T, H, D), as the geometric
  mean over those cases of the time relative to configs[0]; inf where a case fails."""
  times = {}
  for config in configs:
    fwd, fwd_bwd = ours_fns(config)
    times[config] = []
    for shape in shapes:
      q, k, v, do = make_inputs(0, *shape)
      slope = slopes(shape[2])
      for kind, fn, args in (("fwd", fwd, (q, k, v, slope)),
                             ("fwd+bwd", fwd_bwd, (q, k, v, slope, do))):
        try:
          ms = time_jax(fn, *args, reps=7)
        except Exception as e:  # pylint: disable=broad-except
          log(f"  {kind} {shape} {config}: FAILED {type(e).__name__}: {str(e)[:300]}")
          ms = float("inf")
        log(f"  sweep {kind:7s} {shape} {ms:.4f} ms  {config}")
        times[config].append(ms)
  base = times[configs[0]]
  return {config: float(np.exp(np.mean(np.log(np.array(ms) / np.array(base)))))
          for config, ms in times.items()}


def bench_prefill(config: KernelConfig, shapes, log, *, with_fla=True, with_xla=True,
                  with_cudnn=True) -> list[Row]:
  """Forward and forward + backward of every implementation on every (B, T, H, D). When the
  config is not Triton-only, the Triton kernels alone are timed too ("pallas-triton"), and when
  its backward is not Triton, forward + backward with the config's forward and the Triton
  backward ("pallas-triton-bwd")."""
  rows = []
  ours_fwd, ours_fwd_bwd = ours_fns(config)
  triton_config = dataclasses.replace(config, forward_impl="triton", backward_impl="triton")
  triton_fns = ours_fns(triton_config) if triton_config != config else None
  triton_bwd_config = dataclasses.replace(config, backward_impl="triton")
  triton_bwd_fns = ours_fns(triton_bwd_config) if triton_bwd_config != config else None
  xla_fwd, xla_fwd_bwd = xla_fns()
  cudnn_fwd, cudnn_fwd_bwd = cudnn_fns()
  for batch, seq_len, heads, dim in shapes:
    shape = (batch, seq_len, heads, dim)
    q, k, v, do = make_inputs(1, *shape)
    slope = slopes(heads)
    chunk = min(config.block_size, seq_len)
    o, final = ours_fwd(q, k, v, slope)
    grads = ours_fwd_bwd(q, k, v, slope, do)[1:]
    results = {}  # (kind, impl) -> (ms, flops, err)
    results[("fwd", "pallas")] = (time_jax(ours_fwd, q, k, v, slope),
                                  lightning_flops("fwd", *shape, chunk), float("nan"))
    results[("fwd+bwd", "pallas")] = (time_jax(ours_fwd_bwd, q, k, v, slope, do),
                                      lightning_flops("fwd+bwd", *shape, chunk), float("nan"))
    if triton_fns is not None:
      triton_o, _ = triton_fns[0](q, k, v, slope)
      err = rel_err(o, triton_o)
      log(f"  {shape} ours vs the Triton forward: o {err:.2e}")
      for kind, fn, args in (("fwd", triton_fns[0], (q, k, v, slope)),
                             ("fwd+bwd", triton_fns[1], (q, k, v, slope, do))):
        results[(kind, "pallas-triton")] = (time_jax(fn, *args),
                                            lightning_flops(kind, *shape, chunk), err)
    if triton_bwd_fns is not None:
      err = max(rel_err(g, t) for g, t in zip(grads, triton_bwd_fns[1](q, k, v, slope, do)[1:]))
      log(f"  {shape} ours vs the Triton backward: grads {err:.2e}")
      results[("fwd+bwd", "pallas-triton-bwd")] = (
          time_jax(triton_bwd_fns[1], q, k, v, slope, do),
          lightning_flops("fwd+bwd", *shape, chunk), err)
    if with_fla:
      try:
        fla_fwd, fla_fwd_bwd = fla_fns(q, k, v, slope, do)
        fla_o, fla_final = fla_fwd()
        fla_grads = fla_fwd_bwd()
        err_o = rel_err(o, to_jax(fla_o))
        err_s = rel_err(final, to_jax(fla_final))
        err_g = max(rel_err(g, to_jax(t)) for g, t in zip(grads, fla_grads))
        log(f"  {shape} ours vs fla: o {err_o:.2e}, final state {err_s:.2e}, grads {err_g:.2e}")
        results[("fwd", "fla")] = (time_torch(fla_fwd), lightning_flops("fwd", *shape, FLA_CHUNK),
                                   max(err_o, err_s))
        results[("fwd+bwd", "fla")] = (time_torch(fla_fwd_bwd),
                                       lightning_flops("fwd+bwd", *shape, FLA_CHUNK), err_g)
      except Exception as e:  # pylint: disable=broad-except
        log(f"  fla failed on {shape}: {type(e).__name__}: {str(e)[:300]}")
    if with_xla:
      xla_o, _ = xla_fwd(q, k, v, slope)
      err = rel_err(o, xla_o)
      log(f"  {shape} ours vs XLA blockwise (float32): o {err:.2e}")
      results[("fwd", "pallas")] = results[("fwd", "pallas")][:2] + (err,)
      results[("fwd", "xla")] = (time_jax(xla_fwd, q, k, v, slope, reps=5),
                                 lightning_flops("fwd", *shape, 256), err)
      results[("fwd+bwd", "xla")] = (time_jax(xla_fwd_bwd, q, k, v, slope, do, reps=5),
                                     lightning_flops("fwd+bwd", *shape, 256), float("nan"))
    if with_cudnn:
      try:
        results[("fwd", "cudnn-softmax")] = (time_jax(cudnn_fwd, q, k, v),
                                             softmax_flops("fwd", *shape), float("nan"))
        results[("fwd+bwd", "cudnn-softmax")] = (time_jax(cudnn_fwd_bwd, q, k, v, do),
                                                 softmax_flops("fwd+bwd", *shape), float("nan"))
      except Exception as e:  # pylint: disable=broad-except
        log(f"  cudnn failed on {shape}: {type(e).__name__}: {str(e)[:300]}")
    for (kind, impl), (ms, flops, err) in results.items():
      row = Row(kind, impl, *shape, ms=ms, tflops=flops / ms / 1e9, rel_err=err)
      row.frac_peak = row.tflops * 1e12 / reporting.PEAK_BF16_FLOPS
      if impl != "cudnn-softmax":
        row.frac_hbm = hbm_floor_bytes(kind, *shape) / (ms * 1e-3) / reporting.HBM_BYTES_PER_S
      if impl.startswith("pallas") and (kind, "fla") in results:
        row.fla_over_ours = results[(kind, "fla")][0] / ms
      rows.append(row)
      log("  " + format_row(row))
    del q, k, v, do, o, final, grads
  return rows


def bench_decode(batches, heads: int, dim: int, log, *, value_tile: int = 64,
                 num_warps: int = 4, with_fla: bool = True) -> list[Row]:
  """One-token decode step: the Pallas kernel, the jnp step (XLA) and fla's fused recurrence."""
  rows = []
  ours = jax.jit(lambda q, k, v, s, st: lightning_attention_decode(
      q, k, v, s, st, value_tile=value_tile, num_warps=num_warps), donate_argnums=4)
  xla = jax.jit(reference.lightning_decode_step, donate_argnums=4)
  for batch in batches:
    keys = jax.random.split(jax.random.key(batch), 4)
    q, k, v = (jax.random.normal(key, (batch, heads, dim), jnp.float32).astype(jnp.bfloat16)
               for key in keys[:3])
    slope = slopes(heads)
    state = jax.random.normal(keys[3], (batch, heads, dim, dim), jnp.float32)
    o_ref, s_ref = reference.lightning_decode_step(q, k, v, slope, state)
    o, s_new = ours(q, k, v, slope, jnp.copy(state))
    err = max(rel_err(o, o_ref), rel_err(s_new, s_ref))
    results = {"pallas": (time_jax_decode(ours, q, k, v, slope, jnp.copy(state)), err),
               "xla": (time_jax_decode(xla, q, k, v, slope, jnp.copy(state)), float("nan"))}
    if with_fla:
      try:
        # pylint: disable=g-import-not-at-top
        import torch
        from fla.ops.simple_gla import fused_recurrent_simple_gla
        # pylint: enable=g-import-not-at-top
        tq, tk, tv = (to_torch(x)[:, None] for x in (q, k, v))
        g_gamma = -to_torch(slope).float()
        t_state = to_torch(jnp.copy(state))

        def fla_step():
          with torch.no_grad():
            return fused_recurrent_simple_gla(tq, tk, tv, g_gamma=g_gamma, scale=1.0,
                                              initial_state=t_state, output_final_state=True)

        fla_o, fla_s = fla_step()
        fla_err = max(rel_err(o, to_jax(fla_o[:, 0])), rel_err(s_new, to_jax(fla_s)))
        results["fla-fused-recurrent"] = (time_torch(fla_step), fla_err)
      except Exception as e:  # pylint: disable=broad-except
        log(f"  fla decode failed at batch {batch}: {type(e).__name__}: {str(e)[:300]}")
    for impl, (ms, e) in results.items():
      row = Row("decode", impl, batch, 1, heads, dim, ms=ms, rel_err=e)
      row.frac_hbm = decode_bytes(batch, heads, dim) / (ms * 1e-3) / reporting.HBM_BYTES_PER_S
      if impl == "pallas" and "fla-fused-recurrent" in results:
        row.fla_over_ours = results["fla-fused-recurrent"][0] / ms
      rows.append(row)
      log("  " + format_row(row))
  return rows


HEADER = ("kind", "impl", "B", "T", "H", "D", "ms", "TFLOP/s", "%peak", "%HBM", "fla/ours",
          "rel_err")


def format_row(row: Row) -> str:
  return (f"{row.kind:8s} {row.impl:20s} B{row.batch:<4d} T{row.seq_len:<6d} H{row.heads:<3d} "
          f"D{row.dim:<4d} {row.ms:9.4f} ms  {row.tflops:7.1f} TF/s  {100 * row.frac_peak:5.1f}% "
          f"peak  {100 * row.frac_hbm:5.1f}% HBM  fla/ours {row.fla_over_ours:5.2f}  "
          f"err {row.rel_err:.1e}")


def markdown_table(rows: list[Row]) -> str:
  return reporting.markdown_table(HEADER, [
      [r.kind, r.impl, r.batch, r.seq_len, r.heads, r.dim, f"{r.ms:.4f}", f"{r.tflops:.1f}",
       f"{100 * r.frac_peak:.1f}", f"{100 * r.frac_hbm:.1f}", f"{r.fla_over_ours:.2f}",
       f"{r.rel_err:.1e}"] for r in rows])


def plot(rows: list[Row], path: str):
  """Time vs T per implementation, one panel per (kind, H)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = sorted({(r.kind, r.heads) for r in rows if r.kind != "decode"})
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
  for ax, (kind, heads) in zip(axes[0], panels):
    for impl in sorted({r.impl for r in rows}):
      pts = sorted((r.seq_len, r.ms) for r in rows
                   if r.kind == kind and r.heads == heads and r.impl == impl)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set(xscale="log", yscale="log", xlabel="T (B*T = 32768)", ylabel="ms",
           title=f"{kind}, H={heads}, D=128, bf16")
    seq_lens = sorted({r.seq_len for r in rows if r.kind == kind and r.heads == heads})
    ax.set_xticks(seq_lens, [f"{t // 1024}K" for t in seq_lens])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
