"""Rollout throughput: whole `generate` calls, their decode step against the HBM floor, and slot
refill against the static batch on a long-tailed mix of lengths.

The floor of one decode step is what it must move through device memory at least: every weight
once (in the compute dtype; every expert is touched at RL batch sizes), the float32 lightning
states read and written, and the softmax KV cache read up to the context.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments import reporting
from m1jax import generate, model
from m1jax.config import ModelConfig


def decode_floor_bytes(cfg: ModelConfig, batch: int, context: int) -> float:
  """Fewest bytes one decode step moves: weights once, lightning states in and out, KV read."""
  counts = model.param_counts(cfg)
  weights = counts["total"] - counts["embedding"]  # one embedding row per sequence
  weights = (weights - counts["lm_head"]) * cfg.jnp_dtype.dtype.itemsize + (
      counts["lm_head"] * jnp.dtype(cfg.jnp_lm_head_dtype).itemsize)
  states = 2 * 4 * cfg.num_lightning_layers * batch * cfg.num_attention_heads * cfg.head_dim ** 2
  kv = (2 * cfg.num_softmax_layers * batch * context * cfg.num_key_value_heads * cfg.head_dim
        * cfg.jnp_dtype.dtype.itemsize)
  return float(weights + states + kv)


@dataclasses.dataclass
class RolloutTiming:
  mode: str  # "static" or "refill S/F"
  rows: int
  prompt_len: int
  new_tokens: int
  generated: int  # tokens generated in the call
  seconds: float  # median call, after a compile call
  tokens_per_s: float
  ms_per_step: float  # seconds over decode steps (static) or slot-refill loop steps
  floor_ms: float  # HBM floor of one static decode step at the mean context
  floor_share: float  # floor_ms / ms_per_step
  finished_slot_share: float


def _eos_ids(cfg: ModelConfig, mean_length: float) -> tuple[int, ...]:
  """Ids that end a row with probability about 1 / mean_length per step under a near-uniform
  next-token distribution (random weights): geometric lengths, a long tail."""
  count = max(1, int(round(cfg.vocab_size / mean_length)))
  return tuple(range(1, cfg.vocab_size, max(1, cfg.vocab_size // count)))[:count]


def time_generate(cfg: ModelConfig, params, rows: int, prompt_len: int, new_tokens: int, *,
                  mean_length: float | None = None, slots: int = 0, refill_rows: int = 0,
                  drain_slots: int = -1,
                  reps: int = 3, seed: int = 0) -> RolloutTiming:
  """Median wall time of `reps` generate calls after one compile call. mean_length None: no EOS
  (every row runs new_tokens); else rows end with probability 1 / mean_length per token."""
  prompts = jax.random.randint(jax.random.key(seed), (rows, prompt_len), 0, cfg.vocab_size)
  gen = generate.GenerateConfig(
      max_new_tokens=new_tokens, repetition_window=0, slots=slots, refill_rows=refill_rows,
      drain_slots=drain_slots if slots else -1,
      eos_token_ids=() if mean_length is None else _eos_ids(cfg, mean_length),
      sampling=generate.SamplingConfig(1.0))
  # The same key every call: the same lengths, so the calls do the same work.
  out, seconds = reporting.median_call(
      lambda: generate.generate(cfg, params, prompts, gen, key=jax.random.key(0)), reps)
  generated = int(np.sum(np.asarray(out.lengths)))
  steps = int(out.decode_steps)
  floor = decode_floor_bytes(cfg, slots or rows, prompt_len + new_tokens // 2)
  floor_ms = 1e3 * floor / reporting.HBM_BYTES_PER_S
  ms_per_step = 1e3 * seconds / max(steps, 1)
  return RolloutTiming(
      mode=(f"refill {slots}/{refill_rows or max(1, slots // 4)}, drain {gen.resolved_drain_slots}"
            if slots else "static"),
      rows=rows, prompt_len=prompt_len, new_tokens=new_tokens, generated=generated,
      seconds=seconds, tokens_per_s=generated / seconds, ms_per_step=ms_per_step,
      floor_ms=floor_ms, floor_share=floor_ms / ms_per_step,
      finished_slot_share=int(out.finished_slot_steps) / max(int(out.slot_steps), 1))


def table(results) -> str:
  return reporting.markdown_table(
      ["mode", "rows", "prompt", "new tokens", "generated", "s per call", "tokens/s",
       "ms per step", "floor ms", "share of floor", "finished slot-steps"],
      [[r.mode, r.rows, r.prompt_len, r.new_tokens, r.generated, f"{r.seconds:.2f}",
        f"{r.tokens_per_s:.0f}", f"{r.ms_per_step:.3f}", f"{r.floor_ms:.3f}",
        f"{100 * r.floor_share:.0f}%", f"{100 * r.finished_slot_share:.0f}%"] for r in results])
