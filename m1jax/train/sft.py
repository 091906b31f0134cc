"""Supervised fine-tuning on task demonstrations (the warm start for RL)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from m1jax import model
from m1jax.config import ModelConfig
from m1jax.data import pipeline
from m1jax.generate import sampling
from m1jax.train import evaluation, optimizer as optimizer_lib, run
from m1jax.train.state import TrainState


def sft_loss(cfg: ModelConfig, params, tokens: jax.Array, loss_mask: jax.Array):
  """Mean next-token NLL over loss_mask tokens + router aux loss. tokens [B, T]; loss_mask [B, T]
  (1 on demonstration tokens; token t is predicted from tokens < t)."""
  out = model.forward(cfg, params, tokens)
  logprobs = sampling.token_logprobs(out.logits[:, :-1], tokens[:, 1:], 1.0)
  mask = loss_mask[:, 1:].astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  nll = -jnp.sum(logprobs * mask) / count
  loss = nll + cfg.router_aux_loss_coef * out.aux_loss
  return loss, {"loss": loss, "nll": nll, "aux_loss": out.aux_loss, "tokens": jnp.sum(mask)}


def sft_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
             tokens: jax.Array, loss_mask: jax.Array):
  """One pure optimizer step -> (state, metrics). Non-finite updates are skipped (see optimizer)."""
  (_, metrics), grads = jax.value_and_grad(sft_loss, argnums=1, has_aux=True)(
      cfg, state.params, tokens, loss_mask)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["skipped"] = (opt_state.notfinite_count > 0).astype(jnp.float32)
  return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                    opt_state=opt_state), metrics


PANELS = {"loss": ("nll",), "held-out accuracy": ("eval/accuracy", "eval/reward"),
          "gradient": ("grad_norm",)}


def train(ctx: run.Context) -> run.Stage:
  """Runs (or resumes) the SFT stage in workdir/sft; returns the finished stage."""
  cfg = ctx.config.sft
  optimizer = optimizer_lib.make_optimizer(cfg.optimizer, cfg.steps)
  stage = run.Stage(ctx, "sft", cfg.steps, optimizer, cfg)
  if stage.finished():
    return stage
  dataset = pipeline.sft_dataset(run.source(ctx, "train"), ctx.tokenizer,
                                 batch_size=cfg.batch_size, max_len=cfg.max_len,
                                 seed=ctx.config.seed)
  data_iter = iter(dataset)
  state, data_state = stage.restore_or_create(
      lambda: run.initial_params(ctx, stage.shardings.params))
  if data_state is not None:
    data_iter.set_state(data_state)
  step_fn = jax.jit(functools.partial(sft_step, ctx.model_cfg, optimizer),
                    in_shardings=(stage.shardings, None, None),
                    out_shardings=(stage.shardings, None),
                    donate_argnums=0)
  eval_set = run.eval_examples(ctx)
  eval_prompt_len = ctx.config.rl.max_prompt_len
  stage.open()

  boundary = {"step": stage.start_step, "data": data_iter.get_state()}  # last completed step

  def loop():
    nonlocal state
    step = stage.start_step
    if step == 0:
      stage.log(0, evaluation.evaluate(ctx, state.params, eval_set, eval_prompt_len))
    while step < cfg.steps:
      batch = next(data_iter)
      state, metrics = step_fn(state, run.to_global(batch.tokens, ctx.mesh),
                               run.to_global(batch.loss_mask, ctx.mesh))
      step += 1
      boundary.update(step=step, data=data_iter.get_state())
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
        metrics.update(evaluation.evaluate(ctx, state.params, eval_set, eval_prompt_len))
      stage.log(step, metrics, postfix={"nll": metrics["nll"]})
      stage.check_finite(step, state, data_iter.get_state())
      stage.save(step, state, data_iter.get_state(), force=step == cfg.steps)

  run.interruptible(
      loop, lambda: stage.save_if_consistent(state, boundary["step"], boundary["data"]))
  stage.close(PANELS)
  return stage
