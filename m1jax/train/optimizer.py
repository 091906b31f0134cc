"""Optimizer: AdamW (paper defaults for RL: b1 0.9, b2 0.95, eps 1e-15) with optax schedules,
global-norm clipping, and skipping of non-finite updates."""

from __future__ import annotations

import jax
import ml_collections
import optax

# A skipped update is counted in ApplyIfFiniteState.notfinite_count; the training loop stops on
# its own limit long before optax would give up and apply a non-finite update.
_NEVER_APPLY_NONFINITE = 2**30


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """cfg.schedule: "constant" (after a linear warmup) or "cosine" (warmup, then cosine decay to
  learning_rate * final_lr_fraction)."""
  if cfg.schedule == "constant":
    return optax.warmup_constant_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction)
  raise ValueError(f"optimizer.schedule={cfg.schedule!r}: choose 'constant' or 'cosine'")


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm(cfg.grad_clip) -> AdamW(schedule), wrapped to skip non-finite updates."""
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_decay_mask)
  chain = adamw
  if cfg.grad_clip > 0:
    chain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return optax.apply_if_finite(chain, _NEVER_APPLY_NONFINITE)


def consecutive_nonfinite(opt_state) -> jax.Array:
  """Number of consecutive skipped (non-finite) updates so far."""
  return opt_state.notfinite_count
