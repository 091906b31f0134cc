"""Optimizer: AdamW (paper defaults for RL: b1 0.9, b2 0.95, eps 1e-15) with optax schedules,
global-norm clipping, and skipping of non-finite updates; optionally with the peak learning rate
and the clipping norm as hyperparameters in the optimizer state (`optax.inject_hyperparams`),
which the RL stages (`rl.stages`) change without rebuilding the state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

# A skipped update is counted in ApplyIfFiniteState.notfinite_count; the training loop stops on
# its own limit long before optax would give up and apply a non-finite update.
_NEVER_APPLY_NONFINITE = 2**30


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                           peak: float | None = None) -> optax.Schedule:
  """cfg.schedule: "constant" (after a linear warmup) or "cosine" (warmup, then cosine decay to
  peak * final_lr_fraction); peak: cfg.learning_rate unless given."""
  peak = cfg.learning_rate if peak is None else peak
  if cfg.schedule == "constant":
    return optax.warmup_constant_schedule(0.0, peak, max(cfg.warmup_steps, 1))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(cfg.warmup_steps, 1), max(total_steps, cfg.warmup_steps + 1),
        end_value=peak * cfg.final_lr_fraction)
  raise ValueError(f"optimizer.schedule={cfg.schedule!r}: choose 'constant' or 'cosine'")


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   injectable: bool = False) -> optax.GradientTransformation:
  """clip_by_global_norm(cfg.grad_clip) -> AdamW(schedule), wrapped to skip non-finite updates.

  injectable: the same, with three hyperparameters in the optimizer state (set by
  `set_hyperparams`, read by `hyperparams`): `learning_rate` (the peak: the step's rate is the
  schedule's shape, peak 1, times it), `grad_clip` (inf: off) and `schedule` (the shape's value
  at the last update, written by the optimizer)."""
  adamw_args = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=_decay_mask)
  if injectable:
    def chain(schedule, learning_rate, grad_clip):
      return optax.chain(optax.clip_by_global_norm(grad_clip),
                         optax.adamw(schedule * learning_rate, **adamw_args))

    inner = optax.inject_hyperparams(chain)(
        schedule=learning_rate_schedule(cfg, total_steps, peak=1.0),
        learning_rate=cfg.learning_rate, grad_clip=clip_norm(cfg.grad_clip))
    return optax.apply_if_finite(inner, _NEVER_APPLY_NONFINITE)
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), **adamw_args)
  chain = adamw
  if cfg.grad_clip > 0:
    chain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return optax.apply_if_finite(chain, _NEVER_APPLY_NONFINITE)


def clip_norm(grad_clip: float) -> float:
  """The clipping norm of an injectable optimizer for a config's grad_clip (0: off, inf)."""
  return grad_clip if grad_clip > 0 else math.inf


def consecutive_nonfinite(opt_state) -> jax.Array:
  """Number of consecutive skipped (non-finite) updates so far."""
  return opt_state.notfinite_count


def _injected(opt_state):
  inner = opt_state.inner_state
  return inner if isinstance(inner, optax.InjectStatefulHyperparamsState) else None


def set_hyperparams(opt_state, *, learning_rate, grad_clip):
  """The state of an injectable optimizer with its peak learning rate and clipping norm set
  (scalars, traced or not; grad_clip inf: off)."""
  inner = _injected(opt_state)
  if inner is None:
    raise ValueError("set_hyperparams needs make_optimizer(..., injectable=True)")
  values = dict(inner.hyperparams)
  values["learning_rate"] = jnp.asarray(learning_rate, values["learning_rate"].dtype)
  values["grad_clip"] = jnp.asarray(grad_clip, values["grad_clip"].dtype)
  return opt_state._replace(inner_state=inner._replace(hyperparams=values))


def hyperparams(opt_state) -> dict[str, jax.Array]:
  """What the last update of an injectable optimizer used: learning_rate (the schedule's value
  times the peak) and grad_clip (inf: off); {} for the plain optimizer."""
  inner = _injected(opt_state)
  if inner is None:
    return {}
  values = inner.hyperparams
  return {"learning_rate": values["schedule"] * values["learning_rate"],
          "grad_clip": values["grad_clip"]}
