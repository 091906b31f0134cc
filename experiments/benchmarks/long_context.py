"""Long context on one device: prefill a C-token prompt and decode N tokens with `m1jax.generate`,
for the hybrid model and its all-softmax twin, and the longest context that fits in memory.

Every generate call runs without EOS and without early truncation (repetition_window 0), sampling
at temperature 1, so every row generates exactly N tokens. Each call is `generate.generate` inside
one `jax.jit`, compiled ahead of time (so compile time is measured on its own and XLA's memory
estimate of the compiled program is at hand), then run once untimed and `reps` times timed:

- prefill_s: the median call with max_new_tokens=1, i.e. the prompt in, the first token out (the
  engine's prefill, the last position's LM head and one sample);
- total_s: the median call with max_new_tokens=N;
- ms_per_step: (total_s - prefill_s) / (N - 1), the engine's own `lax.while_loop` decode step
  (a step is not observable from outside that loop, so this is a per-step mean over N - 1 steps
  of the median calls).

Memory: XLA's estimate of the compiled max_new_tokens=N program (its arguments, the weights
included, outputs and temporaries), and the device's memory_stats()["peak_bytes_in_use"], a peak
over the whole process that cannot be reset: a point reports it as its own only when the peak
rose during the point, else as an upper bound ("<= x").

The prefill computes the LM head at the last prompt position only (`generate.engine._prefill`),
and its softmax layers attend over the prompt only (not over the cache's slots), with cuDNN flash
attention on a GPU in 16-bit compute: no [T, T] scores. In float32, or on CPU, XLA's attention
builds the [B, H, T, T] scores (fine at test sizes, out of memory at long contexts).
experiments/bench_long_context.py is the entry point.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from experiments import reporting
from experiments.benchmarks import generate as decode_benchmark
from m1jax import generate
from m1jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LongContextTiming:
  """One (model, context) point."""
  model: str
  context: int  # prompt tokens per row
  batch: int
  new_tokens: int  # N, generated per row
  prefill_s: float  # median max_new_tokens=1 call: prompt in, first token out
  ms_per_step: float  # decode: (total_s - prefill_s) / (new_tokens - 1)
  total_s: float  # median max_new_tokens=N call
  prefill_compile_s: float  # lower + compile of the max_new_tokens=1 program
  compile_s: float  # lower + compile of the max_new_tokens=N program
  lower_s: float  # of compile_s: tracing and lowering in jax (kernels included)
  xla_estimate_gib: float  # N program, compiled.memory_analysis(): args + out - aliased + temp
  # memory_stats()["peak_bytes_in_use"] after this point (the process's peak so far; None where
  # the backend gives no memory_stats, e.g. CPU)
  device_peak_gib: float | None
  device_peak_here: bool | None  # the peak rose during this point: it is this point's own peak
  kv_cache_gib: float  # softmax keys + values of context + N - 1 slots (generate.cache_bytes)
  lightning_state_mib: float  # float32 [H, D, D] states of every lightning layer and row


@dataclasses.dataclass(frozen=True)
class MaxContext:
  """The longest context one model generates at without running out of device memory."""
  model: str
  batch: int
  new_tokens: int
  max_context: int  # the largest context that ran (0: none did)
  first_failure: int | None  # the smallest context that ran out of memory (None: limit ran)
  resolution: int  # first_failure - max_context <= resolution
  kv_cache_gib: float | None  # at max_context, as LongContextTiming (None: max_context 0)
  lightning_state_mib: float | None
  attempts: str  # "context ok|oom" in the order tried


def all_models(hybrid: ModelConfig) -> dict[str, ModelConfig]:
  """{"hybrid": hybrid, "all_softmax": its all-softmax twin}."""
  return {"hybrid": hybrid, "all_softmax": decode_benchmark.all_softmax(hybrid)}


def generate_config(new_tokens: int) -> generate.GenerateConfig:
  """Every row runs to new_tokens: no EOS, no early truncation; temperature 1."""
  return generate.GenerateConfig(max_new_tokens=new_tokens, eos_token_ids=(), repetition_window=0,
                                 sampling=generate.SamplingConfig(temperature=1.0))


def random_prompts(cfg: ModelConfig, batch: int, context: int, seed: int = 0) -> jax.Array:
  """int32 [B, C] uniform random token ids."""
  return jax.random.randint(jax.random.key(seed), (batch, context), 0, cfg.vocab_size, "int32")


def compile_generate(cfg: ModelConfig, gen: generate.GenerateConfig, params, prompts: jax.Array,
                     key: jax.Array) -> tuple[Any, float, float]:
  """(compiled (params, prompts [B, C], key) -> GenerateOutput, seconds of lower + compile,
  seconds of the lowering alone)."""
  program = jax.jit(lambda p, t, k: generate.generate(cfg, p, t, gen, key=k))
  return reporting.compile_timed(program, params, prompts, key)


def xla_estimate_bytes(compiled) -> float:
  """XLA's memory estimate of a compiled program: arguments + outputs - aliased + temporaries."""
  stats = compiled.memory_analysis()
  if stats is None:
    return float("nan")
  return float(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def device_peak_bytes() -> int | None:
  """memory_stats()["peak_bytes_in_use"] of device 0 (None where there are no memory_stats)."""
  stats = jax.devices()[0].memory_stats()
  return None if stats is None else stats.get("peak_bytes_in_use")


def free_device_memory() -> None:
  """Drops compiled programs and collectable arrays, so the next attempt starts clean."""
  gc.collect()
  jax.clear_caches()


def time_point(name: str, cfg: ModelConfig, params, batch: int, context: int, new_tokens: int,
               reps: int = 3, seed: int = 0) -> tuple[LongContextTiming, np.ndarray]:
  """Times one (model, context) point (see the module doc) -> (timing, tokens [B, N] of the
  timed max_new_tokens=N calls)."""
  if new_tokens < 2 or reps < 1:
    raise ValueError(f"new_tokens={new_tokens} must be >= 2 and reps={reps} >= 1")
  args = (params, random_prompts(cfg, batch, context, seed), jax.random.key(seed))
  peak_before = device_peak_bytes()
  first, prefill_compile_s, _ = compile_generate(cfg, generate_config(1), *args)
  _, prefill_s = reporting.median_call(lambda: first(*args), reps)
  del first
  full, compile_s, lower_s = compile_generate(cfg, generate_config(new_tokens), *args)
  out, total_s = reporting.median_call(lambda: full(*args), reps)
  tokens = np.asarray(out.tokens)
  estimate = xla_estimate_bytes(full)
  del full, out
  peak = device_peak_bytes()
  cache = generate.cache_bytes(cfg, batch, context + new_tokens - 1)
  timing = LongContextTiming(
      model=name, context=context, batch=batch, new_tokens=new_tokens, prefill_s=prefill_s,
      ms_per_step=1e3 * (total_s - prefill_s) / (new_tokens - 1), total_s=total_s,
      prefill_compile_s=prefill_compile_s, compile_s=compile_s, lower_s=lower_s,
      xla_estimate_gib=estimate / 2**30,
      device_peak_gib=None if peak is None else peak / 2**30,
      device_peak_here=None if peak is None else peak > peak_before,
      kv_cache_gib=cache.softmax / 2**30, lightning_state_mib=cache.lightning / 2**20)
  free_device_memory()
  return timing, tokens


def time_contexts(configs: dict[str, ModelConfig], params: dict[str, Any],
                  contexts: Sequence[int], batch: int, new_tokens: int, reps: int = 3,
                  seed: int = 0, log=print, on_point: Callable[[list], Any] | None = None
                  ) -> tuple[list[LongContextTiming], dict[tuple[str, int], np.ndarray]]:
  """Every (model, context) point, contexts ascending, the models side by side at each ->
  (timings, {(model, context): tokens [B, N]}). on_point(timings so far) runs after each point
  (the script writes its files there, so a run cut short keeps what it measured)."""
  timings, tokens = [], {}
  for context in sorted(contexts):
    for name, cfg in configs.items():
      log(f"{name:>12s} context {context:>8d}: prefill + {new_tokens} new tokens, batch {batch}")
      timing, tokens[(name, context)] = time_point(name, cfg, params[name], batch, context,
                                                   new_tokens, reps, seed)
      log(f"{name:>12s} context {context:>8d}: prefill {timing.prefill_s:.3f} s, decode "
          f"{timing.ms_per_step:.3f} ms/step, total {timing.total_s:.3f} s, compile "
          f"{timing.prefill_compile_s:.1f} + {timing.compile_s:.1f} s, XLA estimate "
          f"{timing.xla_estimate_gib:.3g} GiB, device peak {_peak_cell(timing) or 'n/a'} GiB")
      timings.append(timing)
      if on_point is not None:
        on_point(timings)
  return timings, tokens


def is_out_of_memory(error: BaseException) -> bool:
  """XLA's out-of-memory error: a JaxRuntimeError with status RESOURCE_EXHAUSTED."""
  message = str(error)
  return isinstance(error, jax.errors.JaxRuntimeError) and (
      "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower())


def fits_in_memory(run: Callable[[], Any]) -> bool:
  """Calls run(); False if it ran out of device memory (any other error propagates). Device
  memory is freed afterwards either way."""
  try:
    run()
    fits = True
  except jax.errors.JaxRuntimeError as error:
    if not is_out_of_memory(error):
      raise
    fits = False
  free_device_memory()
  return fits


def find_max_context(fits: Callable[[int], bool], known_fit: int, resolution: int,
                     limit: int) -> tuple[int, int | None, list[tuple[int, bool]]]:
  """The largest context <= limit for which fits(context) holds, to `resolution`.

  Doubles from known_fit (a context known to fit; 0: none, then the first try is `resolution`)
  until the first failure or `limit`, then bisects between the last success and the first
  failure until they are at most `resolution` apart. Assumes fits is monotone.
  Returns (largest success or known_fit, first failure or None if `limit` fits, the attempts
  [(context, fits)] in order).
  """
  if resolution < 1 or limit < max(known_fit, 1):
    raise ValueError(f"resolution={resolution} must be >= 1 and limit={limit} >= known_fit="
                     f"{known_fit} and >= 1")
  attempts = []

  def attempt(context: int) -> bool:
    attempts.append((context, fits(context)))
    return attempts[-1][1]

  good, bad = known_fit, None
  while bad is None and good < limit:
    context = min(2 * good if good else resolution, limit)
    if attempt(context):
      good = context
    else:
      bad = context
  while bad is not None and bad - good > resolution:
    middle = (good + bad) // 2
    if attempt(middle):
      good = middle
    else:
      bad = middle
  return good, bad, attempts


def find_max(name: str, cfg: ModelConfig, params, batch: int, new_tokens: int, known_fit: int,
             resolution: int, limit: int, seed: int = 0, log=print) -> MaxContext:
  """find_max_context of one model: an attempt compiles and runs the max_new_tokens=N generate
  program of time_point once at that context."""

  def fits(context: int) -> bool:
    def run():
      args = (params, random_prompts(cfg, batch, context, seed), jax.random.key(seed))
      compiled, _, _ = compile_generate(cfg, generate_config(new_tokens), *args)
      jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    ok = fits_in_memory(run)
    log(f"{name:>12s} context {context:>8d}: {'fits' if ok else 'out of memory'} "
        f"({time.perf_counter() - start:.1f} s)")
    return ok

  good, bad, attempts = find_max_context(fits, known_fit, resolution, limit)
  cache = generate.cache_bytes(cfg, batch, good + new_tokens - 1) if good else None
  return MaxContext(
      model=name, batch=batch, new_tokens=new_tokens, max_context=good, first_failure=bad,
      resolution=resolution, kv_cache_gib=cache.softmax / 2**30 if cache else None,
      lightning_state_mib=cache.lightning / 2**20 if cache else None,
      attempts=", ".join(f"{c} {'ok' if ok else 'oom'}" for c, ok in attempts))


def _peak_cell(timing: LongContextTiming) -> str:
  """The device peak in GiB; "<= x" when this point did not raise the process peak (its own
  peak is then only bounded by it); empty without memory_stats."""
  if timing.device_peak_gib is None:
    return ""
  return f"{'' if timing.device_peak_here else '<= '}{timing.device_peak_gib:.3g}"


def table(timings: Sequence[LongContextTiming]) -> str:
  """One row per (model, context)."""
  return reporting.markdown_table(
      ["model", "context", "batch", "new tokens", "prefill s (time to 1st token)",
       "decode ms/step", "total s", "compile s (prefill / full; of full: lower)",
       "XLA estimate GiB (compiled program)", "device peak GiB (memory_stats)",
       "KV cache GiB", "lightning states MiB"],
      [[t.model, t.context, t.batch, t.new_tokens, f"{t.prefill_s:.3f}", f"{t.ms_per_step:.3f}",
        f"{t.total_s:.3f}", f"{t.prefill_compile_s:.1f} / {t.compile_s:.1f} ({t.lower_s:.1f})",
        f"{t.xla_estimate_gib:.3g}", _peak_cell(t), f"{t.kv_cache_gib:.3g}",
        f"{t.lightning_state_mib:.3g}"] for t in timings])


def max_table(results: Sequence[MaxContext]) -> str:
  """One row per model."""
  return reporting.markdown_table(
      ["model", "batch", "new tokens", "max context", "first out of memory", "resolution",
       "KV cache GiB at max", "lightning states MiB at max", "attempts"],
      [[r.model, r.batch, r.new_tokens, r.max_context,
        "none (limit fits)" if r.first_failure is None else r.first_failure, r.resolution,
        "" if r.kv_cache_gib is None else f"{r.kv_cache_gib:.3g}",
        "" if r.lightning_state_mib is None else f"{r.lightning_state_mib:.3g}", r.attempts]
       for r in results])
