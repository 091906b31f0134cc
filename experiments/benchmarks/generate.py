"""Decode-step time against context length, for the hybrid model and an all-softmax twin.

A decode step at context C is the sampler's step: one token per row through `model.forward` on a
cache of C + warmup + steps slots (the sampler preallocates prompt + generation), then a greedy
argmax. Instead of prefilling C tokens, the cache is filled with random values: the first C slots
of every softmax layer hold random keys / values and are marked valid, every lightning state is a
constant [H, D, D] matrix, and the write index is C. A decode step's cost depends on the shapes
(softmax layers attend over all C + warmup + steps slots, masked), not on the values, so this
times the same step as after a real prefill of C tokens without paying for the prefill.
experiments/bench_generate.py is the entry point.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import model
from m1jax.config import SOFTMAX, ModelConfig
from m1jax.generate.memory import cache_bytes


@dataclasses.dataclass(frozen=True)
class DecodeTiming:
  """One (model, context) point."""
  model: str
  context: int
  batch: int
  ms_per_step: float  # median over the timed steps
  tokens_per_s: float  # batch / median step time
  cache_mib: float  # decode cache size (cache_bytes) for this batch and cache length
  compile_s: float  # this step's compile (compiles run concurrently: they overlap)


def all_softmax(cfg: ModelConfig) -> ModelConfig:
  """The same model with every layer a softmax (GQA) layer."""
  return cfg.replace(attn_type_list=(SOFTMAX,) * cfg.num_hidden_layers)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def filled_cache(cfg: ModelConfig, batch: int, context: int, length: int,
                 key: jax.Array) -> model.DecodeCache:
  """A cache of `length` slots whose first `context` hold random keys / values (see module doc)."""
  empty = model.init_cache(cfg, batch, length)
  valid = jnp.arange(length) < context  # [S]
  kv = jax.random.normal(key, (2,) + empty.keys.shape, empty.keys.dtype)  # one draw: fast compile
  kv = jnp.where(valid[None, None, None, :, None, None], kv, 0)
  return model.DecodeCache(
      lightning_states=jnp.full_like(empty.lightning_states, 0.01), keys=kv[0], values=kv[1],
      slot_mask=jnp.broadcast_to(valid, (batch, length)), index=jnp.asarray(context, jnp.int32))


@functools.cache
def _decode_step(cfg: ModelConfig):
  """jit: (params, tokens [B], positions [B], cache) -> (next tokens, positions + 1, cache)."""
  def step(params, tokens, positions, cache):
    out = model.forward(cfg, params, tokens[:, None], positions=positions[:, None], cache=cache)
    return jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32), positions + 1, out.cache
  return jax.jit(step, donate_argnums=(3,))


def _cache_length(context: int, steps: int, warmup: int) -> int:
  return context + warmup + steps


def compile_steps(configs: dict[str, ModelConfig], params: dict[str, Any],
                  points: Sequence[tuple[str, int]], batch: int, steps: int, warmup: int,
                  threads: int) -> dict[tuple[str, int], tuple[Any, float]]:
  """Lowers every (model, context) decode step in turn, then compiles them on `threads` threads.

  XLA compiles without holding the GIL, so the compiles overlap. Returns
  {(model, context): (compiled step, seconds its compile took)}.
  """
  tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
  lowered = []
  for name, context in points:
    cfg = configs[name]
    length = _cache_length(context, steps, warmup)
    cache = jax.eval_shape(lambda cfg=cfg, length=length: model.init_cache(cfg, batch, length))
    lowered.append(_decode_step(cfg).lower(params[name], tokens, tokens, cache))

  def compile_one(lowered_step):
    start = time.perf_counter()
    compiled = lowered_step.compile()
    return compiled, time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    return dict(zip(points, pool.map(compile_one, lowered)))


def time_decode(step, name: str, cfg: ModelConfig, params, batch: int, context: int, steps: int,
                warmup: int, seed: int = 0, compile_s: float = float("nan")) -> DecodeTiming:
  """Median wall time of `steps` calls of the compiled decode `step` (after `warmup`)."""
  length = _cache_length(context, steps, warmup)
  cache = filled_cache(cfg, batch, context, length, jax.random.key(seed))
  tokens = jnp.zeros((batch,), jnp.int32)
  positions = jnp.full((batch,), context, jnp.int32)
  times = []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    tokens, positions, cache = step(params, tokens, positions, cache)
    tokens.block_until_ready()
    times.append(time.perf_counter() - start)
  median = statistics.median(times[warmup:])
  return DecodeTiming(model=name, context=context, batch=batch, ms_per_step=1e3 * median,
                      tokens_per_s=batch / median,
                      cache_mib=cache_bytes(cfg, batch, length).total / 2**20,
                      compile_s=compile_s)


def run(configs: dict[str, ModelConfig], contexts: Sequence[int], batch: int, steps: int,
        warmup: int, seed: int = 0, compile_threads: int = 8, log=print) -> list[DecodeTiming]:
  """Times every (model, context) pair; the models' points are measured side by side."""
  params = {name: model.init(cfg, jax.random.key(seed)) for name, cfg in configs.items()}
  points = [(name, context) for context in contexts for name in configs]
  start = time.perf_counter()
  compiled = compile_steps(configs, params, points, batch, steps, warmup, compile_threads)
  log(f"lowered and compiled {len(points)} decode steps in {time.perf_counter() - start:.1f} s")
  results = []
  for name, context in points:
    step, compile_s = compiled[(name, context)]
    timing = time_decode(step, name, configs[name], params[name], batch, context, steps, warmup,
                         seed, compile_s)
    log(f"{name:>12s} context {context:>7d}: {timing.ms_per_step:8.3f} ms/step")
    results.append(timing)
  return results


def slope_ms_per_1k(results: Sequence[DecodeTiming], name: str) -> float:
  """Least-squares slope of ms/step against context, in ms per 1024 tokens of context."""
  points = [(r.context / 1024, r.ms_per_step) for r in results if r.model == name]
  if len(points) < 2:
    return float("nan")
  x, y = np.asarray(points).T
  return float(np.polyfit(x, y, 1)[0])


def table(results: Sequence[DecodeTiming]) -> str:
  """Side-by-side text table: one row per context, ms/step and tokens/s per model."""
  names = list(dict.fromkeys(r.model for r in results))
  by_key = {(r.model, r.context): r for r in results}
  header = f"{'context':>8s}" + "".join(
      f" {n + ' ms/step':>22s} {n + ' tok/s':>20s}" for n in names)
  lines = [header]
  for context in sorted({r.context for r in results}):
    row = f"{context:>8d}"
    for n in names:
      r = by_key[(n, context)]
      row += f" {r.ms_per_step:>22.3f} {r.tokens_per_s:>20.1f}"
    lines.append(row)
  lines.append("slope (ms per 1K context): " + ", ".join(
      f"{n} {slope_ms_per_1k(results, n):.4f}" for n in names))
  return "\n".join(lines)


def plot(results: Sequence[DecodeTiming], path: str, title: str) -> None:
  """ms/step against context (log2 axis), one line per model, slopes in the legend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(r.model for r in results):
    points = sorted((r.context, r.ms_per_step) for r in results if r.model == name)
    x, y = zip(*points)
    ax.plot(x, y, marker="o",
            label=f"{name} ({slope_ms_per_1k(results, name):.3f} ms per 1K context)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("decode step (ms)")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
