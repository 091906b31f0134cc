"""The RL loop: sample G responses per prompt -> rewards -> group advantages -> dynamic sampling ->
mu off-policy minibatch updates (old log-probs from the sampler) -> metrics.

`rl_update` is the pure, jit-able train step; `train` drives it from a config.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from m1jax import generate, model
from m1jax.config import ModelConfig
from m1jax.data import pipeline
from m1jax.generate import sampling
from m1jax.rl import advantages as advantages_lib
from m1jax.rl import losses
from m1jax.train import context, evaluation, optimizer as optimizer_lib, state as state_lib
from m1jax.train import metrics as metrics_lib
from m1jax.train.stage import Stage
from m1jax.train.transfer import to_global, to_host


class RolloutBatch(NamedTuple):
  """One minibatch of rollouts for `rl_update`. N rows, P prompt columns, L generated columns."""
  sequences: jax.Array  # int32 [N, P + L]: left-padded prompt then the response
  sequence_mask: jax.Array  # bool [N, P + L]: real tokens
  response_mask: jax.Array  # float32 [N, L]: tokens that count in the loss (0 on dropped rows)
  old_logprobs: jax.Array  # float32 [N, L]: sampler log-probs (temperature-scaled, full vocab)
  advantages: jax.Array  # float32 [N]
  ref_logprobs: jax.Array | None  # float32 [N, L] when a KL term is used


def response_logprobs(cfg: ModelConfig, params, sequences, sequence_mask, response_width: int,
                      temperature: float):
  """Teacher-forced log-probs and entropies of the last `response_width` tokens [N, L], computed
  exactly as the sampler reports them (lm_head_dtype, temperature-scaled, full vocabulary)."""
  out = model.forward(cfg, params, sequences, token_mask=sequence_mask)
  total = sequences.shape[1]
  logits = out.logits[:, total - response_width - 1:total - 1]
  targets = sequences[:, total - response_width:]
  logprobs, entropy = sampling.token_logprobs_and_entropy(logits, targets, temperature)
  return logprobs, entropy, out.aux_loss


def rl_loss(cfg: ModelConfig, loss_cfg: losses.LossConfig, temperature: float, params,
            batch: RolloutBatch):
  width = batch.old_logprobs.shape[1]
  logprobs, entropy, aux = response_logprobs(cfg, params, batch.sequences, batch.sequence_mask,
                                             width, temperature)
  loss, metrics = losses.policy_loss(logprobs, batch.old_logprobs, batch.advantages,
                                     batch.response_mask, loss_cfg, ref_logprobs=batch.ref_logprobs,
                                     entropy=entropy)
  mask = batch.response_mask
  metrics["entropy_mean"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  metrics["aux_loss"] = aux
  return loss + cfg.router_aux_loss_coef * aux, metrics


def rl_update(cfg: ModelConfig, loss_cfg: losses.LossConfig, temperature: float,
              optimizer: optax.GradientTransformation, state: state_lib.TrainState,
              batch: RolloutBatch):
  """One pure optimizer step on a rollout minibatch -> (state, metrics)."""
  (_, metrics), grads = jax.value_and_grad(rl_loss, argnums=3, has_aux=True)(
      cfg, loss_cfg, temperature, state.params, batch)
  return state_lib.apply_gradients(optimizer, state, grads, metrics)


_ADVANTAGES = {
    "grpo": advantages_lib.grpo_advantages,
    "dr_grpo": advantages_lib.dr_grpo_advantages,
    "rloo": advantages_lib.rloo_advantages,
    "batch_std": advantages_lib.batch_std_advantages,
}


def compute_advantages(kind: str, rewards_: np.ndarray, group_ids: np.ndarray, num_groups: int):
  return np.asarray(_ADVANTAGES[kind](jnp.asarray(rewards_), jnp.asarray(group_ids), num_groups))


class Rollouts(NamedTuple):
  """Host copies of sampled groups (G consecutive rows per group)."""
  tokens: np.ndarray  # [R, P] prompt tokens (left-padded)
  prompt_mask: np.ndarray  # [R, P]
  completions: np.ndarray  # [R, L]
  logprobs: np.ndarray  # [R, L]
  lengths: np.ndarray  # [R]
  finish_reasons: np.ndarray  # [R]
  rewards: np.ndarray  # [R]
  correct: np.ndarray  # [R] task reward (correctness)


def _take(r: Rollouts, rows: np.ndarray) -> Rollouts:
  return Rollouts(*(x[rows] for x in r))


def _concat(parts: list[Rollouts]) -> Rollouts:
  return Rollouts(*(np.concatenate(xs, axis=0) for xs in zip(*parts)))


class Sampler:
  """Generates and scores G responses for each prompt of a PromptBatch."""

  def __init__(self, ctx: context.Context, rl: ml_collections.ConfigDict):
    self.ctx, self.rl = ctx, rl
    self.gen_cfg = generate.GenerateConfig(
        max_new_tokens=rl.max_new_tokens,
        sampling=generate.SamplingConfig(temperature=rl.temperature, top_k=rl.top_k,
                                         top_p=rl.top_p),
        eos_token_ids=(ctx.tokenizer.eos_id,), pad_id=ctx.tokenizer.pad_id,
        repetition_window=rl.repetition_window, repetition_prob=rl.repetition_prob)

  def __call__(self, params, batch: pipeline.PromptBatch, key) -> Rollouts:
    g = self.rl.samples_per_prompt
    tokens = np.repeat(batch.tokens, g, axis=0)
    mask = np.repeat(batch.mask, g, axis=0)
    examples = [e for e in batch.examples for _ in range(g)]
    out = generate.generate(self.ctx.model_cfg, params, to_global(tokens, self.ctx.mesh),
                            self.gen_cfg, prompt_mask=to_global(mask, self.ctx.mesh), key=key)
    completions, lengths = to_host(out.tokens), to_host(out.lengths)
    reward, correct = evaluation.score(self.ctx, completions, examples, lengths)
    overlong = self.rl.overlong
    if overlong.enabled:
      reward = reward + np.asarray(advantages_lib.overlong_penalty(
          jnp.asarray(lengths), overlong.max_length, overlong.cache_length))
    return Rollouts(tokens, mask, completions, to_host(out.logprobs), lengths,
                    to_host(out.finish_reasons), reward.astype(np.float32), correct)


def collect(sampler: Sampler, params, prompt_iter, key, rl: ml_collections.ConfigDict):
  """Samples until `prompts_per_step` groups with non-zero reward variance are found (dynamic
  sampling) or `max_sampling_rounds` batches were generated. Returns (rollouts of B*G rows,
  row weights [B*G] (0 on unfilled rows), metrics)."""
  b, g = rl.prompts_per_step, rl.samples_per_prompt
  kept, first, rounds = [], None, 0
  while rounds < rl.max_sampling_rounds and sum(len(k.rewards) for k in kept) < b * g:
    rollouts = sampler(params, next(prompt_iter), jax.random.fold_in(key, rounds))
    first = first or rollouts
    rounds += 1
    if not rl.dynamic_sampling:
      kept = [rollouts]
      break
    constant, _ = advantages_lib.zero_variance_groups(rollouts.rewards, np.repeat(np.arange(b), g),
                                                      b)
    kept.append(_take(rollouts, np.flatnonzero(~np.asarray(constant))))
  got = _concat(kept)
  rows = min(len(got.rewards), b * g)
  weights = np.zeros(b * g, np.float32)
  weights[:rows] = 1.0
  if rows < b * g:  # pad with copies of the first rows, weighted 0
    filler = _take(first, np.arange(b * g - rows))
    got = _concat([_take(got, np.arange(rows)), filler])
  else:
    got = _take(got, np.arange(b * g))
  n = np.maximum(first.lengths.size, 1)
  reasons = first.finish_reasons
  metrics = {
      "reward": float(np.mean(first.rewards)),
      "accuracy": float(np.mean(first.correct)),
      "response_length": float(np.mean(first.lengths)),
      "finished_eos": float(np.sum(reasons == generate.FinishReason.EOS) / n),
      "truncated_length": float(np.sum(reasons == generate.FinishReason.LENGTH) / n),
      "truncated_repetition": float(np.sum(reasons == generate.FinishReason.REPETITION) / n),
      "sampling_rounds": float(rounds),
      "filled_groups_frac": rows / (b * g),
  }
  return got, weights, metrics


PANELS = (
    metrics_lib.Panel("reward", "reward / accuracy", ("reward", "eval/reward", "eval/accuracy")),
    metrics_lib.Panel("response length", "tokens", ("response_length",)),
    metrics_lib.Panel("clipping and IS weights", "fraction of tokens",
                      ("clip_frac_high", "clip_frac_low"), "IS weight pi / pi_old",
                      ("is_weight_mean", "is_weight_max")),
    metrics_lib.Panel("optimisation", "global grad norm before clipping", ("grad_norm",),
                      "entropy (nats / token)", ("entropy_mean",)),
    metrics_lib.Panel("policy change per step", "approx. KL(pi_old || pi), k3", ("approx_kl_k3",)),
)

def train(ctx: context.Context, init_params_fn) -> Stage:
  """Runs (or resumes) the RL stage in workdir/rl. init_params_fn(param_shardings) gives the
  starting params (also the KL reference policy)."""
  rl = ctx.config.rl
  b, g, mu = rl.prompts_per_step, rl.samples_per_prompt, rl.updates_per_batch
  rows = b * g
  if rows % (mu * ctx.batch_devices):
    raise ValueError(f"config.rl: prompts_per_step * samples_per_prompt = {rows} must divide into "
                     f"updates_per_batch={mu} minibatches whose size divides over the "
                     f"{ctx.batch_devices} batch devices of the mesh")
  loss_cfg = losses.LossConfig(**rl.loss.to_dict())
  optimizer = optimizer_lib.make_optimizer(rl.optimizer, rl.steps * mu)
  stage = Stage(ctx, "rl", rl.steps, optimizer, rl)
  if stage.finished():
    return stage
  prompts = pipeline.prompt_dataset(context.source(ctx, "train"), ctx.tokenizer, batch_size=b,
                                    max_prompt_len=rl.max_prompt_len, seed=ctx.config.seed + 1)
  prompt_iter = iter(prompts)
  state = stage.restore_or_create(lambda: init_params_fn(stage.shardings.params), prompt_iter)
  ref_params = None
  if loss_cfg.kl_coef > 0:  # the reference policy is the starting point of this stage
    ref_params = init_params_fn(stage.shardings.params)
  update = jax.jit(functools.partial(rl_update, ctx.model_cfg, loss_cfg, rl.temperature, optimizer),
                   in_shardings=(stage.shardings, None), out_shardings=(stage.shardings, None),
                   donate_argnums=0)
  ref_logprobs_fn = jax.jit(lambda p, s, m: response_logprobs(
      ctx.model_cfg, p, s, m, rl.max_new_tokens, rl.temperature)[0])
  sampler = Sampler(ctx, rl)
  eval_set = context.eval_examples(ctx)
  base_key = jax.random.key(ctx.config.seed)
  group_ids = np.repeat(np.arange(b), g)

  def minibatches(rollouts: Rollouts, weights: np.ndarray, advantages: np.ndarray, key):
    order = np.asarray(jax.random.permutation(key, rows))
    for part in np.split(order, mu):
      r = _take(rollouts, part)
      sequences = np.concatenate([r.tokens, r.completions], axis=1)
      response = (np.arange(rl.max_new_tokens)[None] < r.lengths[:, None]).astype(np.float32)
      seq_mask = np.concatenate([r.prompt_mask, response > 0], axis=1)
      put = lambda x: to_global(x, ctx.mesh)
      sequences_d, seq_mask_d = put(sequences.astype(np.int32)), put(seq_mask)
      ref = None if ref_params is None else ref_logprobs_fn(ref_params, sequences_d, seq_mask_d)
      yield RolloutBatch(sequences_d, seq_mask_d, put(response * weights[part][:, None]),
                         put(r.logprobs.astype(np.float32)),
                         put(advantages[part].astype(np.float32)),
                         ref)

  def step_fn(state, step):
    key = jax.random.fold_in(base_key, step)
    rollouts, weights, metrics = collect(sampler, state.params, prompt_iter,
                                         jax.random.fold_in(key, 0), rl)
    advantages = compute_advantages(rl.advantage, rollouts.rewards, group_ids, b)
    update_metrics = []
    for batch in minibatches(rollouts, weights, advantages, jax.random.fold_in(key, 1)):
      state, m = update(state, batch)
      update_metrics.append(jax.device_get(m))
    metrics.update({k: float(np.mean([float(m[k]) for m in update_metrics]))
                    for k in update_metrics[0]})
    metrics["advantage_abs_mean"] = float(np.mean(np.abs(advantages) * weights))
    return state, metrics

  stage.run(state, prompt_iter, step_fn, panels=PANELS, postfix=("reward", "loss"),
            updates_per_step=mu,
            evaluate=lambda params: evaluation.evaluate(ctx, params, eval_set, rl.max_prompt_len))
  return stage
