"""The RL loop: sample G responses per prompt -> rewards -> group advantages -> dynamic sampling ->
[old log-probs recomputed by the trainer] -> mu off-policy minibatch updates -> metrics.

Three policies: the rollout policy that sampled the tokens (the sampler, with the params of
`rl.rollout_lag` steps ago), the old policy of the objective's ratio (`rl.old_logprobs`:
the sampler's log-probs, or the trainer's own forward before the first update) and the policy
being trained. `rl.loss.rollout_correction` corrects for rollout != old, `rl.routing_replay`
makes the trainer's MoE use the experts the sampler chose (docs/rl_objectives.md).

With `rl.stages` the run goes through stages (m1jax/train/rl_stages.py), each with its own
generation window and settings: the step's programs are built (and compiled) once per stage, the
optimizer state carries over (the learning rate and clipping norm are hyperparameters in it).

`rl_update` is the pure, jit-able train step; `train` drives it from a config.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from typing import Callable, NamedTuple

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
from m1jax.train import rl_stages
from m1jax.train.stage import Stage
from m1jax.train.transfer import to_global, to_host


class RolloutBatch(NamedTuple):
  """One minibatch of rollouts for `rl_update`. N rows, P prompt columns, L generated columns,
  Ly layers, k experts per token."""
  sequences: jax.Array  # int32 [N, P + L]: left-padded prompt then the response
  sequence_mask: jax.Array  # bool [N, P + L]: real tokens
  response_mask: jax.Array  # float32 [N, L]: tokens that count in the loss (0 on dropped rows)
  # float32 [N, L]: the old policy's log-probs (temperature-scaled, full vocab): the sampler's,
  # or the trainer's own (rl.old_logprobs=recompute)
  old_logprobs: jax.Array
  advantages: jax.Array  # float32 [N]
  ref_logprobs: jax.Array | None  # float32 [N, L] when a KL term is used
  rollout_logprobs: jax.Array | None = None  # float32 [N, L]: the sampler's, when recomputed
  # experts [N, P + L, Ly, k], mask [N, P + L] (rl.routing_replay): the sampler's experts
  routing_replay: model.RoutingReplay | None = None


def response_logprobs(cfg: ModelConfig, params, sequences, sequence_mask, response_width: int,
                      temperature: float, vocab_limit: int | None = None,
                      routing_replay: model.RoutingReplay | None = None):
  """Teacher-forced log-probs and entropies of the last `response_width` tokens [N, L], computed
  exactly as the sampler reports them (lm_head_dtype, temperature-scaled, ids < vocab_limit),
  the LM head in chunks (sampling.head_token_logprobs: no [N, L, V] logits), with the MoE
  routing of `routing_replay` where given."""
  out = model.forward(cfg, params, sequences, token_mask=sequence_mask, compute_logits=False,
                      routing_replay=routing_replay)
  total = sequences.shape[1]
  hidden = out.hidden[:, total - response_width - 1:total - 1]
  targets = sequences[:, total - response_width:]
  logprobs, entropy = sampling.head_token_logprobs(cfg, hidden, params["lm_head"], targets,
                                                   temperature, vocab_limit)
  return logprobs, entropy, out.aux_loss


def rl_loss(cfg: ModelConfig, loss_cfg: losses.LossConfig, temperature: float, params,
            batch: RolloutBatch, vocab_limit: int | None = None):
  width = batch.old_logprobs.shape[1]
  logprobs, entropy, aux = response_logprobs(cfg, params, batch.sequences, batch.sequence_mask,
                                             width, temperature, vocab_limit,
                                             batch.routing_replay)
  loss, metrics = losses.policy_loss(logprobs, batch.old_logprobs, batch.advantages,
                                     batch.response_mask, loss_cfg, ref_logprobs=batch.ref_logprobs,
                                     entropy=entropy, rollout_logprobs=batch.rollout_logprobs)
  mask = batch.response_mask
  metrics["entropy_mean"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  metrics["aux_loss"] = aux
  return loss + cfg.router_aux_loss_coef * aux, metrics


def rl_update(cfg: ModelConfig, loss_cfg: losses.LossConfig, temperature: float,
              optimizer: optax.GradientTransformation, state: state_lib.TrainState,
              batch: RolloutBatch, vocab_limit: int | None = None,
              hyperparams: dict | None = None):
  """One pure optimizer step on a rollout minibatch -> (state, metrics). vocab_limit: as the
  sampler's SamplingConfig.vocab_limit. hyperparams: {"learning_rate", "grad_clip"} set in the
  state of an injectable optimizer (optimizer.make_optimizer) before the step."""
  if hyperparams is not None:
    state = state.replace(opt_state=optimizer_lib.set_hyperparams(state.opt_state, **hyperparams))
  (_, metrics), grads = jax.value_and_grad(rl_loss, argnums=3, has_aux=True)(
      cfg, loss_cfg, temperature, state.params, batch, vocab_limit)
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
  experts: np.ndarray | None = None  # [R, L, Ly, k] (rl.routing_replay): GenerateOutput.experts


def _take(r: Rollouts, rows: np.ndarray) -> Rollouts:
  return Rollouts(*(None if x is None else x[rows] for x in r))


def _concat(parts: list[Rollouts]) -> Rollouts:
  return Rollouts(*(None if xs[0] is None else np.concatenate(xs, axis=0) for xs in zip(*parts)))


class StepStats:
  """What one RL step measures about itself: wall seconds per named phase, summed over its uses
  (`with stats("update"):`; each phase ends with its device work: a host transfer), and counts
  summed over the step (`stats.add("slot_steps", n)`)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.counts: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, phase: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

  def add(self, name: str, value) -> None:
    self.counts[name] = self.counts.get(name, 0.0) + float(value)

  def metrics(self) -> dict[str, float]:
    return {f"time/{phase}": s for phase, s in self.seconds.items()}


class Sampler:
  """Generates and scores G responses for each prompt of a PromptBatch."""

  def __init__(self, ctx: context.Context, rl: ml_collections.ConfigDict):
    self.ctx, self.rl = ctx, rl
    self.gen_cfg = generate.GenerateConfig(
        max_new_tokens=rl.max_new_tokens,
        sampling=generate.SamplingConfig(temperature=rl.temperature, top_k=rl.top_k,
                                         top_p=rl.top_p, vocab_limit=ctx.vocab_limit),
        eos_token_ids=(ctx.tokenizer.eos_id,), pad_id=ctx.tokenizer.pad_id,
        repetition_window=rl.repetition_window, repetition_prob=rl.repetition_prob,
        slots=rl.decode_slots, refill_rows=rl.refill_rows,
        drain_slots=rl.drain_slots,
        record_experts=rl.routing_replay)

  def __call__(self, params, batch: pipeline.PromptBatch, key,
               timer: StepStats | None = None) -> Rollouts:
    timer = timer or StepStats()
    g = self.rl.samples_per_prompt
    tokens = np.repeat(batch.tokens, g, axis=0)
    mask = np.repeat(batch.mask, g, axis=0)
    examples = [e for e in batch.examples for _ in range(g)]
    with timer("generate"):
      out = generate.generate(self.ctx.model_cfg, params, to_global(tokens, self.ctx.mesh),
                              self.gen_cfg, prompt_mask=to_global(mask, self.ctx.mesh), key=key)
      completions, lengths = to_host(out.tokens), to_host(out.lengths)
    timer.add("slot_steps", to_host(out.slot_steps))
    timer.add("finished_slot_steps", to_host(out.finished_slot_steps))
    with timer("score"):
      reward, correct = evaluation.score(self.ctx, completions, examples, lengths)
    overlong = self.rl.overlong
    if overlong.enabled:
      reward = reward + np.asarray(advantages_lib.overlong_penalty(
          jnp.asarray(lengths), overlong.max_length, overlong.cache_length))
    experts = None if out.experts is None else to_host(out.experts)
    return Rollouts(tokens, mask, completions, to_host(out.logprobs), lengths,
                    to_host(out.finish_reasons), reward.astype(np.float32), correct, experts)


def collect(sampler: Sampler, params, prompt_iter, key, rl: ml_collections.ConfigDict,
            timer: StepStats | None = None):
  """Samples until `prompts_per_step` groups with non-zero reward variance are found (dynamic
  sampling) or `max_sampling_rounds` batches were generated. Returns (rollouts of B*G rows,
  row weights [B*G] (0 on unfilled rows), metrics)."""
  b, g = rl.prompts_per_step, rl.samples_per_prompt
  kept, first, rounds, generated = [], None, 0, 0
  while rounds < rl.max_sampling_rounds and sum(len(k.rewards) for k in kept) < b * g:
    rollouts = (sampler(params, next(prompt_iter), jax.random.fold_in(key, rounds))
                if timer is None else
                sampler(params, next(prompt_iter), jax.random.fold_in(key, rounds), timer))
    first = first or rollouts
    rounds += 1
    generated += int(np.sum(rollouts.lengths))
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
      "generated_tokens": float(generated),
      "filled_groups_frac": rows / (b * g),
      # The static batch decodes every row until its longest one: the share of those slot-steps
      # spent on rows that had already finished.
      "finished_slot_share": float(1 - np.sum(first.lengths)
                                   / max(first.lengths.size * np.max(first.lengths), 1)),
  }
  return got, weights, metrics


def replay_inputs(rollouts: Rollouts, response_width: int) -> tuple[np.ndarray, np.ndarray]:
  """The trainer's routing replay for rows of `rollouts` (sampled with experts recorded):
  experts [R, P + L, Ly, k] (the sampler's, 0 on the prompt) and mask [R, P + L] (True on the
  response tokens the sampler fed to the model, 0 .. length - 2; the prompt and the last token
  route as usual)."""
  rows, width = rollouts.tokens.shape
  fed = np.arange(response_width)[None] < rollouts.lengths[:, None] - 1
  prompt = np.zeros((rows, width) + rollouts.experts.shape[2:], rollouts.experts.dtype)
  return (np.concatenate([prompt, rollouts.experts], axis=1),
          np.concatenate([np.zeros((rows, width), bool), fed], axis=1))


PANELS = (
    metrics_lib.Panel("reward", "reward / accuracy", ("reward", "eval/reward", "eval/accuracy")),
    metrics_lib.Panel("response length", "tokens", ("response_length",)),
    metrics_lib.Panel("clipping and IS weights", "fraction of tokens",
                      ("clip_frac_high", "clip_frac_low"), "IS weight pi / pi_old",
                      ("is_weight_mean", "is_weight_max")),
    metrics_lib.Panel("optimisation", "global grad norm before clipping", ("grad_norm",),
                      "entropy (nats / token)", ("entropy_mean",)),
    metrics_lib.Panel("policy change per step", "approx. KL(pi_old || pi), k3", ("approx_kl_k3",)),
    metrics_lib.Panel("seconds per step", "seconds",
                      ("time/generate", "time/score", "time/update", "time/eval")),
)
# With recomputed old log-probs (rollout_metrics).
ROLLOUT_PANELS = (
    metrics_lib.Panel("rollout vs old policy", "effective sample size / Pearson r",
                      ("rollout_ess_token", "rollout_ess_seq", "rollout_prob_pearson")),
)
# With rl.stages (the boundaries are marked on every panel).
STAGE_PANELS = (
    metrics_lib.Panel("generation window", "tokens", ("max_new_tokens", "response_length"),
                      "share of responses", ("truncated_length",)),
    metrics_lib.Panel("stage settings", "learning rate (used)", ("learning_rate",),
                      "grad clip norm (used)", ("grad_clip",)),
)


class _Program(NamedTuple):
  """What a step runs with, for one stage's rl config (built, and compiled, once per stage)."""
  rl: ml_collections.ConfigDict
  recompute: bool  # the old log-probs come from the trainer
  sampler: "Sampler"
  update: Callable  # (state, RolloutBatch) -> (state, metrics), jitted
  logprobs_fn: Callable  # (params, sequences, sequence_mask, replay) -> log-probs [N, L], jitted
  rollout_metrics_fn: Callable  # (old, rollout, mask) -> metrics, jitted


def recomputes(rl: ml_collections.ConfigDict) -> bool:
  """Whether the old log-probs come from the trainer: rl.old_logprobs=recompute, or implied by a
  rollout correction (which needs them)."""
  return rl.old_logprobs == "recompute" or rl.loss.rollout_correction != "none"


class ParamsHistory:
  """The sampler's params under rollout lag k: those the trainer had k steps ago.

  `sampler_params(params)` is called once per step with the trainer's params at the start of
  the step; it returns the params of k steps earlier (the first params until k steps have
  passed). Copies (on device, same shardings) are kept of the last k steps' params, since the
  train step donates its input. k = 0 returns `params` itself: nothing is copied.
  """

  def __init__(self, lag: int, shardings=None):
    self.lag = lag
    self._kept: collections.deque = collections.deque(maxlen=lag)
    self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)

  def sampler_params(self, params):
    if self.lag == 0:
      return params
    oldest = self._kept[0] if self._kept else params
    self._kept.append(self._copy(params))
    return oldest


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
  staged = bool(rl.stages)
  optimizer = optimizer_lib.make_optimizer(rl.optimizer, rl.steps * mu, injectable=staged)
  stage = Stage(ctx, "rl", rl.steps, optimizer, rl)
  if stage.finished():
    return stage
  prompts = pipeline.prompt_dataset(context.source(ctx, "train"), ctx.tokenizer, batch_size=b,
                                    max_prompt_len=rl.max_prompt_len, seed=ctx.config.seed + 1)
  prompt_iter = iter(prompts)
  schedule = rl_stages.StageSchedule(rl)
  data = rl_stages.StagedData(prompt_iter, schedule) if staged else prompt_iter
  state = stage.restore_or_create(lambda: init_params_fn(stage.shardings.params), data)
  ref_params = None
  if any(c.loss.kl_coef > 0 for c in schedule.configs):  # the reference policy: the RL start
    ref_params = init_params_fn(stage.shardings.params)

  def build(stage_rl: ml_collections.ConfigDict) -> _Program:
    loss_cfg = losses.LossConfig(**stage_rl.loss.to_dict())
    step = functools.partial(rl_update, ctx.model_cfg, loss_cfg, stage_rl.temperature, optimizer,
                             vocab_limit=ctx.vocab_limit)
    if staged:
      hyperparams = {"learning_rate": stage_rl.optimizer.learning_rate,
                     "grad_clip": optimizer_lib.clip_norm(stage_rl.optimizer.grad_clip)}
      jitted = jax.jit(lambda s, batch, h: step(s, batch, hyperparams=h),
                       in_shardings=(stage.shardings, None, None),
                       out_shardings=(stage.shardings, None), donate_argnums=0)
      update = lambda s, batch: jitted(s, batch, hyperparams)
    else:
      update = jax.jit(step, in_shardings=(stage.shardings, None),
                       out_shardings=(stage.shardings, None), donate_argnums=0)
    logprobs_fn = jax.jit(lambda p, s, m, replay: response_logprobs(
        ctx.model_cfg, p, s, m, stage_rl.max_new_tokens, stage_rl.temperature, ctx.vocab_limit,
        replay)[0])
    return _Program(stage_rl, recomputes(stage_rl), Sampler(ctx, stage_rl), update, logprobs_fn,
                    jax.jit(functools.partial(losses.rollout_metrics, cfg=loss_cfg)))

  programs: dict[int, _Program] = {}

  def program() -> _Program:
    """The current stage's program (the previous stage's is dropped when it ends)."""
    if schedule.index not in programs:
      programs.clear()
      programs[schedule.index] = build(schedule.config)
    return programs[schedule.index]

  history = ParamsHistory(rl.rollout_lag, stage.shardings.params)
  eval_set = context.eval_examples(ctx)
  base_key = jax.random.key(ctx.config.seed)
  group_ids = np.repeat(np.arange(b), g)

  def minibatches(p: _Program, rollouts: Rollouts, weights: np.ndarray, advantages: np.ndarray,
                  key):
    order = np.asarray(jax.random.permutation(key, rows))
    width = p.rl.max_new_tokens
    batches = []
    for part in np.split(order, mu):
      r = _take(rollouts, part)
      sequences = np.concatenate([r.tokens, r.completions], axis=1)
      response = (np.arange(width)[None] < r.lengths[:, None]).astype(np.float32)
      seq_mask = np.concatenate([r.prompt_mask, response > 0], axis=1)
      put = lambda x: to_global(x, ctx.mesh)
      sequences_d, seq_mask_d = put(sequences.astype(np.int32)), put(seq_mask)
      replay = (None if r.experts is None else model.RoutingReplay(
          *(put(x) for x in replay_inputs(r, width))))
      ref = (None if ref_params is None
             else p.logprobs_fn(ref_params, sequences_d, seq_mask_d, replay))
      batches.append(RolloutBatch(sequences_d, seq_mask_d, put(response * weights[part][:, None]),
                                  put(r.logprobs.astype(np.float32)),
                                  put(advantages[part].astype(np.float32)),
                                  ref, routing_replay=replay))
    return batches

  def recompute_old_logprobs(p: _Program, params, batches: list[RolloutBatch]):
    """The trainer's log-probs before the first update become the old policy's; the sampler's
    the rollout policy's. Also the rollout-vs-old metrics of the whole generation batch."""
    batches = [batch._replace(old_logprobs=p.logprobs_fn(params, batch.sequences,
                                                         batch.sequence_mask,
                                                         batch.routing_replay),
                              rollout_logprobs=batch.old_logprobs) for batch in batches]
    old, rollout, mask = (np.concatenate([to_host(getattr(batch, name)) for batch in batches])
                          for name in ("old_logprobs", "rollout_logprobs", "response_mask"))
    metrics = jax.device_get(p.rollout_metrics_fn(old, rollout, mask))
    return batches, {k: float(v) for k, v in metrics.items()}

  def step_fn(state, step):
    p = program()
    timer = StepStats()
    key = jax.random.fold_in(base_key, step)
    rollouts, weights, metrics = collect(p.sampler, history.sampler_params(state.params),
                                         prompt_iter, jax.random.fold_in(key, 0), p.rl, timer)
    with timer("advantages"):
      advantages = compute_advantages(p.rl.advantage, rollouts.rewards, group_ids, b)
    update_metrics = []
    with timer("update"):
      batches = minibatches(p, rollouts, weights, advantages, jax.random.fold_in(key, 1))
      if p.recompute:
        batches, rollout_metrics = recompute_old_logprobs(p, state.params, batches)
        metrics.update(rollout_metrics)
      for batch in batches:
        state, m = p.update(state, batch)
        update_metrics.append(jax.device_get(m))
    metrics.update({k: float(np.mean([float(m[k]) for m in update_metrics]))
                    for k in update_metrics[0]})
    metrics["advantage_abs_mean"] = float(np.mean(np.abs(advantages) * weights))
    metrics.update(timer.metrics())
    metrics["time/generated_tokens_per_s"] = (metrics["generated_tokens"]
                                              / max(timer.seconds["generate"], 1e-9))
    metrics["time/trained_tokens_per_s"] = (
        float(np.sum(rollouts.lengths * (weights > 0))) / max(timer.seconds["update"], 1e-9))
    if staged:
      metrics.update(stage=schedule.index, stage_step=step + 1 - schedule.start,
                     max_new_tokens=p.rl.max_new_tokens)
      moved = schedule.end_step(step + 1, metrics)
      if moved and ctx.is_main:
        stage.progress.write(moved)
    return state, metrics

  def evaluate(params):
    timer = StepStats()
    with timer("eval"):
      results = evaluation.evaluate(ctx, params, eval_set, rl.max_prompt_len)
    return {**results, **timer.metrics()}

  panels = (PANELS + (ROLLOUT_PANELS if any(map(recomputes, schedule.configs)) else ())
            + (STAGE_PANELS if staged else ()))
  stage.run(state, data, step_fn, panels=panels,
            postfix=("reward", "loss", "time/generate", "time/update"), updates_per_step=mu,
            evaluate=evaluate)
  return stage
