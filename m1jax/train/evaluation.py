"""Scoring sampled responses, and held-out evaluation: greedy generation on eval prompts."""

from __future__ import annotations

import numpy as np

from m1jax import generate
from m1jax.data import pipeline
from m1jax.rl import rewards
from m1jax.train.context import Context
from m1jax.train.transfer import to_global, to_host


def score(ctx: Context, tokens: np.ndarray, examples, lengths: np.ndarray):
  """Decodes responses once -> (combined reward [B] float32, task reward (correctness) [B]).
  Each response is verified once: the "task" component is reused when the reward has one."""
  scores = rewards.score_responses(ctx.reward_fn, ctx.tokenizer, tokens, examples, lengths=lengths)
  if "task" in scores.components:
    return scores.rewards, scores.components["task"]
  return scores.rewards, rewards.score_batch(ctx.reward_fn.task, scores.texts, examples)


def evaluate(ctx: Context, params, examples: list, max_prompt_len: int) -> dict[str, float]:
  """eval/reward: mean combined reward; eval/accuracy: mean task reward (correctness) — over the
  held-out examples, greedy decoding; eval/length: mean response length."""
  cfg = ctx.config.eval
  gen_cfg = generate.GenerateConfig(
      max_new_tokens=cfg.max_new_tokens,
      sampling=generate.SamplingConfig(temperature=0.0, vocab_limit=ctx.vocab_limit),
      eos_token_ids=(ctx.tokenizer.eos_id,), pad_id=ctx.tokenizer.pad_id, repetition_window=0)
  batch_size = -(-cfg.batch_size // ctx.batch_devices) * ctx.batch_devices
  totals = {"reward": [], "accuracy": [], "length": []}
  for batch in pipeline.eval_prompt_batches(examples, ctx.tokenizer, batch_size=batch_size,
                                            max_prompt_len=max_prompt_len):
    out = generate.generate(ctx.model_cfg, params, to_global(batch.tokens, ctx.mesh), gen_cfg,
                            prompt_mask=to_global(batch.mask, ctx.mesh))
    tokens, lengths = to_host(out.tokens), to_host(out.lengths)
    valid = np.asarray(batch.valid)
    # Only the real rows are scored (padding rows repeat an example: no sandbox runs for them).
    reward, correct = score(ctx, tokens[valid], [e for e, v in zip(batch.examples, valid) if v],
                            lengths[valid])
    totals["reward"].append(reward)
    totals["accuracy"].append(correct)
    totals["length"].append(lengths[valid])
  return {f"eval/{k}": float(np.mean(np.concatenate(v))) for k, v in totals.items()}
