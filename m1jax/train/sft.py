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
from m1jax.train import context, evaluation, optimizer as optimizer_lib, state as state_lib
from m1jax.train import metrics as metrics_lib
from m1jax.train.stage import Stage
from m1jax.train.transfer import to_global


def sft_loss(cfg: ModelConfig, params, tokens: jax.Array, loss_mask: jax.Array,
             vocab_limit: int | None = None):
  """Mean next-token NLL over loss_mask tokens + router aux loss. tokens [B, T]; loss_mask [B, T]
  (1 on demonstration tokens; token t is predicted from tokens < t). vocab_limit: ids >= it are
  outside the distribution (as the sampler's)."""
  out = model.forward(cfg, params, tokens, compute_logits=False)
  logprobs, _ = sampling.head_token_logprobs(cfg, out.hidden[:, :-1], params["lm_head"],
                                             tokens[:, 1:], 1.0, vocab_limit)
  mask = loss_mask[:, 1:].astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  nll = -jnp.sum(logprobs * mask) / count
  loss = nll + cfg.router_aux_loss_coef * out.aux_loss
  return loss, {"loss": loss, "nll": nll, "aux_loss": out.aux_loss, "tokens": jnp.sum(mask)}


def sft_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, state: state_lib.TrainState,
             tokens: jax.Array, loss_mask: jax.Array, vocab_limit: int | None = None):
  """One pure optimizer step -> (state, metrics). Non-finite updates are skipped (see optimizer)."""
  (_, metrics), grads = jax.value_and_grad(sft_loss, argnums=1, has_aux=True)(
      cfg, state.params, tokens, loss_mask, vocab_limit)
  return state_lib.apply_gradients(optimizer, state, grads, metrics)


PANELS = (
    metrics_lib.Panel("loss", "NLL (nats / demonstration token)", ("nll",)),
    metrics_lib.Panel("held-out evaluation (greedy)", "accuracy / reward",
                      ("eval/accuracy", "eval/reward")),
    metrics_lib.Panel("gradient", "global norm before clipping", ("grad_norm",)),
)


def train(ctx: context.Context) -> Stage:
  """Runs (or resumes) the SFT stage in workdir/sft; returns the finished stage."""
  cfg = ctx.config.sft
  optimizer = optimizer_lib.make_optimizer(cfg.optimizer, cfg.steps)
  stage = Stage(ctx, "sft", cfg.steps, optimizer, cfg)
  if stage.finished():
    return stage
  dataset = pipeline.sft_dataset(context.source(ctx, "train"), ctx.tokenizer,
                                 batch_size=cfg.batch_size, max_len=cfg.max_len,
                                 seed=ctx.config.seed)
  data_iter = iter(dataset)
  state = stage.restore_or_create(
      lambda: context.initial_params(ctx, stage.shardings.params), data_iter)
  update = jax.jit(functools.partial(sft_step, ctx.model_cfg, optimizer,
                                     vocab_limit=ctx.vocab_limit),
                   in_shardings=(stage.shardings, None, None),
                   out_shardings=(stage.shardings, None),
                   donate_argnums=0)
  eval_set = context.eval_examples(ctx)

  def step_fn(state, step):
    del step
    batch = next(data_iter)
    state, metrics = update(state, to_global(batch.tokens, ctx.mesh),
                            to_global(batch.loss_mask, ctx.mesh))
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  stage.run(state, data_iter, step_fn, panels=PANELS, postfix=("nll",),
            evaluate=lambda params: evaluation.evaluate(ctx, params, eval_set,
                                                        ctx.config.rl.max_prompt_len))
  return stage
