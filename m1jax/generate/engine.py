"""Batched generation: one prefill, then a jit-compiled decode loop over fixed-size caches.

Padding convention: prompts are LEFT-padded to a common width P so that every row's last prompt
token sits in column P - 1 and every row writes cache slot P + s at decode step s. `generate`
accepts a list of token lists (left-padded here to a multiple of `GenerateConfig.pad_multiple`) or
int tokens [B, P] with a bool `prompt_mask` [B, P]; the masked-in tokens of a row, in order, are its
prompt (left- or right-padded arrays both work: rows are re-packed to the left inside the jit).

Lightning layers carry their [H, D, D] state through the prefill (padding contributes zero keys and
values, so the state starts at exactly zero for every row) and update it in O(1) per token; softmax
layers write a KV cache preallocated for P + max_new_tokens - 1 tokens. The whole thing, prefill and
`lax.while_loop` decode, is one `jax.jit` per (ModelConfig, GenerateConfig, B, P): calls with the
same shapes and configs reuse the compiled program.

Rows are independent: row b samples step s with key fold_in(fold_in(key, row_ids[b]), s), so
generating a batch equals generating each prompt alone with the same row id (to floating-point
summation order; the MoE must be dropless, i.e. `moe_capacity_factor=None`, since capacity limits
couple the rows of a batch).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import model
from m1jax.config import DTYPES, ModelConfig
from m1jax.generate import sampling
from m1jax.generate.sampling import SamplingConfig


class FinishReason(enum.IntEnum):
  """Why a row stopped. `FinishReason(v).name.lower()` gives eos, stop_token, length, repetition."""
  LENGTH = 0  # max_new_tokens generated
  EOS = 1  # generated an end-of-sequence token (kept in the output)
  STOP_TOKEN = 2  # generated one of GenerateConfig.stop_token_ids (kept in the output)
  REPETITION = 3  # M1 early truncation: repetition_window tokens in a row with p > repetition_prob


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Static settings of a generation call (a change recompiles).

  max_new_tokens: N, tokens generated per row at most.
  sampling: SamplingConfig (temperature 0 is greedy).
  eos_token_ids: ids that end a row with reason EOS; None: (cfg.eos_token_id,) when it is set.
  stop_token_ids: further ids that end a row, with reason STOP_TOKEN.
  pad_id: fills `tokens` after a row stops (and pads list prompts).
  repetition_window, repetition_prob: MiniMax-M1's early truncation: a row stops, with reason
    REPETITION, once `repetition_window` consecutive generated tokens each had probability
    > `repetition_prob` (the probability of the reported log-prob: exp(logprobs)). 0 disables it.
  pad_multiple: list prompts are left-padded to a multiple of this width, so that calls with
    similar prompt lengths share a compiled program.
  kv_dtype: softmax KV cache dtype name (None: cfg.dtype).
  slots: 0 decodes the whole batch together until its longest row ends. > 0 keeps that many
    decode slots busy: when rows finish, the next pending prompts are prefilled into their slots
    (continuous batching), so a long-tailed batch does not wait on its longest row.
  refill_rows: with slots, how many prompts one refill prefills (0: a quarter of the slots);
    a refill runs once that many slots are free (or fewer prompts remain, or none is decoding).
  drain_slots: with slots, once no prompt is pending and at most this many rows are unfinished,
    they move into that many slots and decode on there: the long tail of a long-tailed batch
    runs at a smaller (cheaper) batch. -1: a quarter of the slots; 0: never.
  record_experts: also return `GenerateOutput.experts`, the MoE experts every generated token
    was routed to (for routing replay in the trainer).
  """

  max_new_tokens: int = 256
  sampling: SamplingConfig = SamplingConfig()
  eos_token_ids: tuple[int, ...] | None = None
  stop_token_ids: tuple[int, ...] = ()
  pad_id: int = 0
  repetition_window: int = 3000
  repetition_prob: float = 0.99
  pad_multiple: int = 32
  kv_dtype: str | None = None
  slots: int = 0
  refill_rows: int = 0
  drain_slots: int = -1
  record_experts: bool = False

  def __post_init__(self):
    if self.eos_token_ids is not None:
      object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    for name in ("max_new_tokens", "pad_multiple"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"GenerateConfig.{name}={value!r}: must be a positive integer")
    if not isinstance(self.repetition_window, int) or self.repetition_window < 0:
      raise ValueError(f"GenerateConfig.repetition_window={self.repetition_window!r}: must be an "
                       "integer >= 0 (0 disables early truncation)")
    if not 0 <= self.repetition_prob < 1:
      raise ValueError(
          f"GenerateConfig.repetition_prob={self.repetition_prob!r}: must be in [0, 1)")
    for name in ("slots", "refill_rows"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"GenerateConfig.{name}={value!r}: must be an integer >= 0")
    if self.slots and self.refill_rows > self.slots:
      raise ValueError(f"GenerateConfig.refill_rows={self.refill_rows} exceeds slots={self.slots}")
    drain = self.drain_slots
    if (not isinstance(drain, int) or isinstance(drain, bool) or drain < -1
        or (self.slots and drain >= self.slots)):
      raise ValueError(f"GenerateConfig.drain_slots={drain!r}: must be -1 (a quarter of the "
                       f"slots), 0 (never drain) or an integer below slots={self.slots}")
    if self.kv_dtype is not None and self.kv_dtype not in DTYPES:
      raise ValueError(f"GenerateConfig.kv_dtype={self.kv_dtype!r}: must be None or one of "
                       f"{sorted(DTYPES)}")

  @property
  def resolved_drain_slots(self) -> int:
    """drain_slots with -1 resolved: a quarter of the slots."""
    return self.slots // 4 if self.drain_slots == -1 else self.drain_slots

  def resolved_eos(self, cfg: ModelConfig) -> tuple[int, ...]:
    if self.eos_token_ids is not None:
      return self.eos_token_ids
    return () if cfg.eos_token_id is None else (cfg.eos_token_id,)

  def validate_for(self, cfg: ModelConfig) -> None:
    """Checks token ids and top_k against the vocabulary."""
    if self.sampling.top_k > cfg.vocab_size:
      raise ValueError(f"SamplingConfig.top_k={self.sampling.top_k} exceeds vocab_size="
                       f"{cfg.vocab_size}")
    if self.sampling.vocab_limit is not None and self.sampling.vocab_limit > cfg.vocab_size:
      raise ValueError(f"SamplingConfig.vocab_limit={self.sampling.vocab_limit} exceeds "
                       f"vocab_size={cfg.vocab_size}")
    ids = {"eos_token_ids": self.resolved_eos(cfg), "stop_token_ids": self.stop_token_ids,
           "pad_id": (self.pad_id,)}
    for name, values in ids.items():
      bad = [t for t in values if not 0 <= t < cfg.vocab_size]
      if bad:
        raise ValueError(f"GenerateConfig.{name}: token id {bad[0]} outside the vocabulary "
                         f"[0, {cfg.vocab_size})")


class GenerateOutput(NamedTuple):
  """Generated tokens and what the trainer needs. B rows, P prompt columns, N = max_new_tokens."""
  tokens: jax.Array  # int32 [B, N]: generated tokens (stop token included), pad_id after the stop
  logprobs: jax.Array  # float32 [B, N]: log_softmax(logits / T)[token] (T = 1 if greedy); 0 after
  lengths: jax.Array  # int32 [B]: number of generated tokens
  finish_reasons: jax.Array  # int32 [B]: FinishReason values
  prompt_tokens: jax.Array  # int32 [B, P]: left-padded prompts (pad_id in padding)
  prompt_mask: jax.Array  # bool [B, P]: True on prompt tokens
  prompt_lengths: jax.Array  # int32 [B]
  slot_steps: jax.Array  # int32 []: decode steps x decode slots (rows of the batch, or slots)
  finished_slot_steps: jax.Array  # int32 []: of those, steps of slots with no unfinished row
  decode_steps: jax.Array  # int32 []: decode steps (forwards of one token per slot)
  # [B, N, L, k] (GenerateConfig.record_experts) in model.expert_id_dtype (uint8 up to 256
  # experts): the top-k experts of every layer when generated token i was fed to the model,
  # for i < lengths - 1; 0 for the last generated token (never fed) and after it.
  experts: jax.Array | None = None

  @property
  def completion_mask(self) -> jax.Array:
    """bool [B, N]: True on generated tokens."""
    return jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

  @property
  def sequences(self) -> jax.Array:
    """int32 [B, P + N]: left-padded prompt followed by the generated tokens."""
    return jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)

  @property
  def sequence_mask(self) -> jax.Array:
    """bool [B, P + N]: real tokens of `sequences` (model.forward's token_mask for them).

    model.forward(cfg, params, sequences, token_mask=sequence_mask).logits[:, P - 1 : P + N - 1]
    are the logits that produced `tokens`.
    """
    return jnp.concatenate([self.prompt_mask, self.completion_mask], axis=1)


class _LoopState(NamedTuple):
  step: jax.Array  # int32 []: index of the next token to sample
  tokens: jax.Array  # [B, N]
  logprobs: jax.Array  # [B, N]
  lengths: jax.Array  # [B]
  finish_reasons: jax.Array  # [B]
  done: jax.Array  # bool [B]
  run: jax.Array  # int32 [B]: current run of consecutive tokens with probability > repetition_prob
  cache: Any  # model.DecodeCache
  experts: Any = None  # [B, N, L, k] when recording experts


def _is_in(tokens, ids: Sequence[int]):
  if not ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(ids, jnp.int32))


def stop_update(tokens, logprobs, run, step, *, eos_ids: Sequence[int], stop_ids: Sequence[int],
                max_new_tokens: int, repetition_window: int, repetition_prob: float):
  """Stop rules for the tokens sampled at `step` (all rows; callers mask finished rows).

  tokens int [B]; logprobs [B]; run int32 [B] before this token -> (run after it, stops bool [B],
  reason int32 [B]). Priority when several rules hold at once: EOS, STOP_TOKEN, REPETITION, LENGTH.
  """
  if repetition_window:
    run = jnp.where(jnp.exp(logprobs) > repetition_prob, run + 1, 0)
    is_repetition = run >= repetition_window
  else:
    is_repetition = jnp.zeros(tokens.shape, bool)
  is_eos = _is_in(tokens, eos_ids)
  is_stop = _is_in(tokens, stop_ids)
  is_length = jnp.broadcast_to(step + 1 >= max_new_tokens, tokens.shape)
  reason = jnp.select([is_eos, is_stop, is_repetition],
                      [FinishReason.EOS, FinishReason.STOP_TOKEN, FinishReason.REPETITION],
                      FinishReason.LENGTH).astype(jnp.int32)
  return run, is_eos | is_stop | is_repetition | is_length, reason


def _left_align(tokens, mask, pad_id):
  """Moves each row's masked-in tokens (in order) to the right end. [B, P] -> [B, P] twice."""
  order = jnp.argsort(mask, axis=1, stable=True)  # padding (False) first, order kept
  mask = jnp.take_along_axis(mask, order, axis=1)
  tokens = jnp.where(mask, jnp.take_along_axis(tokens, order, axis=1), pad_id)
  return tokens, mask


def _stop_rules(cfg: ModelConfig, gen: GenerateConfig) -> dict[str, Any]:
  return dict(eos_ids=gen.resolved_eos(cfg), stop_ids=gen.stop_token_ids,
              max_new_tokens=gen.max_new_tokens, repetition_window=gen.repetition_window,
              repetition_prob=gen.repetition_prob)


@jax.named_scope("sample")
def _sample_step(gen: GenerateConfig, logits, row_keys, steps, active):
  """Token `steps` of every row: (token [B], logprob [B]), pad_id / 0 on inactive rows."""
  step_keys = jax.vmap(jax.random.fold_in)(row_keys, steps)
  token = sampling.sample(logits, step_keys, gen.sampling)
  logprob = sampling.token_logprobs(logits, token, gen.sampling.temperature,
                                    gen.sampling.vocab_limit)
  return jnp.where(active, token, gen.pad_id), jnp.where(active, logprob, 0.0)


@jax.named_scope("prefill")
def _prefill(cfg: ModelConfig, gen: GenerateConfig, params, tokens, mask, length: int):
  """Prefill of left-aligned prompts [B, P] into a fresh cache of `length` slots -> (logits of
  the last position [B, V], the cache after the prompt)."""
  kv_dtype = None if gen.kv_dtype is None else DTYPES[gen.kv_dtype]
  cache = model.init_cache(cfg, tokens.shape[0], length, kv_dtype)
  prefill = model.forward(cfg, params, tokens, token_mask=mask,
                          positions=model.positions_from_mask(mask, tokens.shape), cache=cache,
                          fresh_cache=True, compute_logits=False)
  logits = model.lm_head_logits(cfg, prefill.hidden[:, -1:], params["lm_head"])[:, 0]
  return logits, prefill.cache


def _unstacked(cfg: ModelConfig) -> bool:
  """Whether the decode loop reads one array per layer group and per softmax layer's KV cache:
  when the scan over several layer groups is unrolled anyway. From stacked arrays, XLA copies
  every group's weights and the whole KV cache (several times) at every step."""
  return cfg.layer_scan_unroll >= cfg.num_layer_groups > 1


def _decode_params(cfg: ModelConfig, params, rows: int):
  """The weights a decode loop of `rows` rows reads: in compute dtype (made once per call, not
  per step), with each MoE's gate and up weights stacked (model.fuse_gate_up) where its steps
  multiply every expert, unstacked by layer group (model.unstack_layer_groups) where
  `_unstacked`."""
  params = model.compute_params(cfg, params)
  if model.dense_at_decode(cfg, rows):
    params = model.fuse_gate_up(params)
  return model.unstack_layer_groups(cfg, params) if _unstacked(cfg) else params


def _decode_cache(cfg: ModelConfig, cache: model.DecodeCache) -> model.DecodeCache:
  """The cache the decode loop carries: one KV array per layer (model.unstack_cache) where
  `_unstacked`."""
  return model.unstack_cache(cache) if _unstacked(cfg) else cache


def _generate(cfg: ModelConfig, gen: GenerateConfig, params, tokens, mask, key, row_ids):
  """The jitted program. tokens int32 [B, P]; mask bool [B, P]; key: PRNG key; row_ids int32 [B]."""
  batch, prompt_width = tokens.shape
  params = _decode_params(cfg, params, batch)
  n = gen.max_new_tokens
  tokens, mask = _left_align(tokens, mask, gen.pad_id)
  prompt_lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
  logits, cache = _prefill(cfg, gen, params, tokens, mask, prompt_width + n - 1)
  cache = _decode_cache(cfg, cache)
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
  stop_rules = _stop_rules(cfg, gen)

  def record(state: _LoopState, logits) -> _LoopState:
    """Samples token `state.step` of every unfinished row and applies the stop rules."""
    active = ~state.done
    token, logprob = _sample_step(gen, logits, row_keys, jnp.full((batch,), state.step), active)
    run, stops, reason = stop_update(token, logprob, state.run, state.step, **stop_rules)
    finishing = active & stops
    return state._replace(
        step=state.step + 1,
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], (0, state.step)),
        lengths=jnp.where(active, state.step + 1, state.lengths),
        finish_reasons=jnp.where(finishing, reason, state.finish_reasons),
        done=state.done | finishing, run=run)

  @jax.named_scope("decode")
  def decode(state: _LoopState) -> _LoopState:
    """Feeds the last sampled token (step - 1) and samples the next one."""
    last = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)  # [B, 1]
    positions = (prompt_lengths + state.step - 1)[:, None]
    out = model.forward(cfg, params, last, positions=positions, cache=state.cache,
                        return_experts=gen.record_experts)
    if gen.record_experts:  # the experts of the fed token, step - 1
      experts = jax.lax.dynamic_update_slice_in_dim(
          state.experts, out.routed_experts.astype(state.experts.dtype), state.step - 1, axis=1)
      state = state._replace(experts=experts)
    return record(state._replace(cache=out.cache), out.logits[:, 0])

  def keep_going(state: _LoopState):
    return (state.step < n) & ~jnp.all(state.done)

  state = _LoopState(
      step=jnp.zeros((), jnp.int32), tokens=jnp.full((batch, n), gen.pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, n), jnp.float32), lengths=jnp.zeros((batch,), jnp.int32),
      finish_reasons=jnp.full((batch,), FinishReason.LENGTH, jnp.int32),
      done=jnp.zeros((batch,), bool), run=jnp.zeros((batch,), jnp.int32), cache=cache,
      experts=_no_experts(cfg, gen, batch))
  state = jax.lax.while_loop(keep_going, decode, record(state, logits))
  slot_steps = (state.step - 1) * batch  # decode steps after the prefill's token
  return GenerateOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths,
                        finish_reasons=state.finish_reasons, prompt_tokens=tokens, prompt_mask=mask,
                        prompt_lengths=prompt_lengths, slot_steps=slot_steps,
                        finished_slot_steps=slot_steps - jnp.sum(state.lengths - 1),
                        decode_steps=state.step - 1,
                        experts=_fed_experts(gen, state.experts, state.lengths))


def _no_experts(cfg: ModelConfig, gen: GenerateConfig, rows: int):
  """The zero experts buffer [rows, N, L, k] when recording them, else None."""
  if not gen.record_experts:
    return None
  return jnp.zeros((rows, gen.max_new_tokens, cfg.num_hidden_layers, cfg.num_experts_per_tok),
                   model.expert_id_dtype(cfg.num_local_experts))


def _fed_experts(gen: GenerateConfig, experts, lengths):
  """experts of tokens 0 .. lengths - 2 (those fed while the row ran), 0 elsewhere."""
  if not gen.record_experts:
    return None
  fed = jnp.arange(gen.max_new_tokens)[None, :] < lengths[:, None] - 1
  return jnp.where(fed[:, :, None, None], experts, 0).astype(experts.dtype)


class _RefillState(NamedTuple):
  """The slot-refill loop. S slots decode rows of R prompts; the cache is a ring of P + N slots
  per row, written at one shared column (cache.index) per step."""
  prompt: jax.Array  # int32 [S]: the prompt a slot decodes (R: none)
  step: jax.Array  # int32 [S]: index of the slot's next token
  last: jax.Array  # int32 [S]: the slot's last sampled token (fed at the next step)
  run: jax.Array  # int32 [S]: repetition run of the slot's row
  active: jax.Array  # bool [S]: the slot's row is unfinished
  pending: jax.Array  # int32 []: the next prompt not yet prefilled
  tokens: jax.Array  # [R + 1, N] (row R: a sink for writes of idle slots)
  logprobs: jax.Array  # [R + 1, N]
  lengths: jax.Array  # [R + 1]
  finish_reasons: jax.Array  # [R + 1]
  slot_steps: jax.Array  # int32 []
  finished_slot_steps: jax.Array  # int32 []
  decode_steps: jax.Array  # int32 []
  cache: Any  # model.DecodeCache of S rows
  experts: Any = None  # [R + 1, N, L, k] when recording experts


def _generate_refill(cfg: ModelConfig, gen: GenerateConfig, params, tokens, mask, key, row_ids):
  """Continuous batching: gen.slots decode slots, refilled from the R prompts as rows finish.

  Every row samples exactly as in `_generate` (its row key, its own step count, its own
  positions), so each prompt's output equals generating it alone with the same row id (to
  floating-point summation order).
  """
  num_prompts, width = tokens.shape
  n, slots = gen.max_new_tokens, gen.slots
  refill = gen.refill_rows or max(1, slots // 4)
  draining = gen.resolved_drain_slots
  params = _decode_params(cfg, params, draining or slots)  # the smallest batch decoded
  ring = width + n  # a row lives at most width + n - 1 slots: the ring never wraps onto it
  tokens, mask = _left_align(tokens, mask, gen.pad_id)
  prompt_lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
  stop_rules = _stop_rules(cfg, gen)
  sink = num_prompts

  def record(state: _RefillState, logits, rows: jax.Array, who: jax.Array) -> _RefillState:
    """Samples the next token of the slots `rows` [K] decoding prompts `who` [K] (R where a
    slot has nothing to do: nothing is written for it)."""
    live = who < num_prompts
    prompt = jnp.minimum(who, num_prompts - 1)
    here = state.active.shape[0]  # the loop's slots (fewer once draining)
    slot = jnp.where(live, rows, here)  # writes of dead rows are dropped
    step = state.step[jnp.minimum(rows, here - 1)]
    token, logprob = _sample_step(gen, logits, row_keys[prompt], step, live)
    run, stops, reason = stop_update(token, logprob, state.run[jnp.minimum(rows, here - 1)],
                                     step, **stop_rules)
    finishing = live & stops
    target = jnp.where(live, who, sink)
    column = jnp.minimum(step, n - 1)  # in range also for dead rows (their writes: the sink)
    return state._replace(
        tokens=state.tokens.at[target, column].set(token),
        logprobs=state.logprobs.at[target, column].set(logprob),
        lengths=state.lengths.at[target].set(step + 1),
        finish_reasons=state.finish_reasons.at[target].set(
            jnp.where(finishing, reason, FinishReason.LENGTH)),
        step=state.step.at[slot].set(step + 1, mode="drop"),
        last=state.last.at[slot].set(token, mode="drop"),
        run=state.run.at[slot].set(run, mode="drop"),
        active=state.active.at[slot].set(~finishing, mode="drop"))

  @jax.named_scope("refill")
  def fill(state: _RefillState, count: int) -> _RefillState:
    """Prefills up to `count` pending prompts into free slots (the first ones) and samples
    their first tokens."""
    free = ~state.active
    rows = jnp.nonzero(free, size=count, fill_value=slots)[0]  # slot of each new row
    who = state.pending + jnp.arange(count)
    take = (rows < slots) & (who < num_prompts)
    who = jnp.where(take, who, num_prompts)
    safe = jnp.minimum(who, num_prompts - 1)
    logits, small = _prefill(cfg, gen, params, tokens[safe], mask[safe] & take[:, None], width)
    cache = state.cache
    columns = (cache.index - width + jnp.arange(width)) % ring  # the prompt ends before index
    rows_ok = jnp.where(take, rows, slots)  # dropped writes for rows not taken

    def put(slots_kv, new_kv):  # the new rows' prompts into their slots of every layer
      if isinstance(slots_kv, tuple):  # [B, S, KV, D] per layer
        return tuple(put(layer[None], new[None])[0] for layer, new in zip(slots_kv, new_kv))
      return slots_kv.at[:, rows_ok[:, None], columns[None, :]].set(
          new_kv.astype(slots_kv.dtype), mode="drop")

    cache = cache.replace(
        lightning_states=cache.lightning_states.at[:, rows_ok].set(small.lightning_states,
                                                                   mode="drop"),
        keys=put(cache.keys, small.keys), values=put(cache.values, small.values),
        slot_mask=cache.slot_mask.at[rows_ok].set(False, mode="drop")
        .at[rows_ok[:, None], columns[None, :]].set(mask[safe] & take[:, None], mode="drop"))
    state = state._replace(
        cache=cache, pending=state.pending + jnp.sum(take, dtype=jnp.int32),
        prompt=state.prompt.at[rows_ok].set(who, mode="drop"),
        step=state.step.at[rows_ok].set(0, mode="drop"),
        run=state.run.at[rows_ok].set(0, mode="drop"))
    return record(state, logits, rows_ok, who)

  @jax.named_scope("decode")
  def decode(state: _RefillState) -> _RefillState:
    """Feeds every active slot's last token and samples its next one."""
    active = state.active
    safe = jnp.minimum(state.prompt, num_prompts - 1)
    positions = (prompt_lengths[safe] + state.step - 1)[:, None]
    out = model.forward(cfg, params, state.last[:, None], token_mask=active[:, None],
                        positions=positions, cache=state.cache, return_experts=gen.record_experts)
    if gen.record_experts:  # the experts of each active row's fed token, its step - 1
      target = jnp.where(active, state.prompt, sink)
      state = state._replace(experts=state.experts.at[target, jnp.maximum(state.step - 1, 0)].set(
          out.routed_experts[:, 0].astype(state.experts.dtype)))
    cache = out.cache.replace(index=out.cache.index % ring)
    busy = jnp.sum(active, dtype=jnp.int32)
    here = active.shape[0]
    counted = jnp.where(busy > 0, here, 0)  # a step with no active slot (rare) is not counted
    state = state._replace(cache=cache, slot_steps=state.slot_steps + counted,
                           finished_slot_steps=state.finished_slot_steps + counted - busy,
                           decode_steps=state.decode_steps + (busy > 0))
    return record(state, out.logits[:, 0], jnp.arange(here),
                  jnp.where(active, state.prompt, num_prompts))

  @jax.named_scope("drain")
  def drain(state: _RefillState) -> _RefillState:
    """The unfinished rows (at most `draining`) moved to the first of `draining` slots."""
    count = jnp.sum(state.active, dtype=jnp.int32)
    rows = jnp.nonzero(state.active, size=draining, fill_value=0)[0]  # old slot of each new one
    take = lambda x, axis=0: jnp.take(x, rows, axis=axis)
    cache = state.cache
    kv = lambda a: tuple(take(x) for x in a) if isinstance(a, tuple) else take(a, 1)
    cache = cache.replace(lightning_states=take(cache.lightning_states, 1), keys=kv(cache.keys),
                          values=kv(cache.values), slot_mask=take(cache.slot_mask))
    return state._replace(
        prompt=take(state.prompt), step=take(state.step), last=take(state.last),
        run=take(state.run), active=take(state.active) & (jnp.arange(draining) < count),
        cache=cache)

  def step(state: _RefillState) -> _RefillState:
    free = slots - jnp.sum(state.active)
    remaining = num_prompts - state.pending
    due = (remaining > 0) & ((free >= jnp.minimum(refill, remaining)) | ~jnp.any(state.active))
    state = jax.lax.cond(due, lambda s: fill(s, refill), lambda s: s, state)
    # Decoding outside a cond (on an H200, 2% faster per step than under one): idle slots write
    # only to the sink row, so a step after which nothing is active changes nothing.
    return decode(state)

  def keep_filling(state: _RefillState):
    return (state.pending < num_prompts) | (jnp.sum(state.active) > draining)

  kv_dtype = None if gen.kv_dtype is None else DTYPES[gen.kv_dtype]
  state = _RefillState(
      prompt=jnp.full((slots,), num_prompts, jnp.int32), step=jnp.zeros((slots,), jnp.int32),
      last=jnp.full((slots,), gen.pad_id, jnp.int32), run=jnp.zeros((slots,), jnp.int32),
      active=jnp.zeros((slots,), bool), pending=jnp.zeros((), jnp.int32),
      tokens=jnp.full((num_prompts + 1, n), gen.pad_id, jnp.int32),
      logprobs=jnp.zeros((num_prompts + 1, n), jnp.float32),
      lengths=jnp.zeros((num_prompts + 1,), jnp.int32),
      finish_reasons=jnp.full((num_prompts + 1,), FinishReason.LENGTH, jnp.int32),
      slot_steps=jnp.zeros((), jnp.int32), finished_slot_steps=jnp.zeros((), jnp.int32),
      decode_steps=jnp.zeros((), jnp.int32),
      cache=_decode_cache(cfg, model.init_cache(cfg, slots, ring, kv_dtype)),
      experts=_no_experts(cfg, gen, num_prompts + 1))
  state = fill(state, slots)  # the first prompts into every slot
  state = jax.lax.while_loop(keep_filling, step, state)
  if draining:  # no prompt pending, at most `draining` rows left: on in a smaller batch
    state = jax.lax.while_loop(lambda s: jnp.any(s.active), decode, drain(state))
  return GenerateOutput(tokens=state.tokens[:-1], logprobs=state.logprobs[:-1],
                        lengths=state.lengths[:-1], finish_reasons=state.finish_reasons[:-1],
                        prompt_tokens=tokens, prompt_mask=mask, prompt_lengths=prompt_lengths,
                        slot_steps=state.slot_steps,
                        finished_slot_steps=state.finished_slot_steps,
                        decode_steps=state.decode_steps,
                        experts=_fed_experts(gen, state.experts[:-1] if gen.record_experts
                                             else None, state.lengths[:-1]))


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))
_generate_refill_jit = jax.jit(_generate_refill, static_argnums=(0, 1))


def _pack_prompts(prompts: Sequence[Sequence[int]], pad_multiple: int, pad_id: int):
  """Left-pads token lists to a multiple of pad_multiple -> (tokens [B, P] int32, mask [B, P])."""
  if not prompts:
    raise ValueError("prompts: empty batch")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise ValueError(f"prompts[{lengths.index(0)}] is empty: every prompt needs a token")
  width = pad_multiple * math.ceil(max(lengths) / pad_multiple)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for b, prompt in enumerate(prompts):
    tokens[b, width - len(prompt):] = np.asarray(prompt, np.int32)
    mask[b, width - len(prompt):] = True
  return tokens, mask


def _on_host(x) -> np.ndarray | None:
  """x as a numpy array; None when it is traced or spans other hosts (then it is not checked)."""
  try:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return None
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None  # traced: is_fully_addressable or the conversion raise


def generate(cfg: ModelConfig, params, prompts, config: GenerateConfig | None = None, *,
             prompt_mask=None, key=None, row_ids=None, **overrides) -> GenerateOutput:
  """Generates up to N = max_new_tokens tokens for every prompt of a batch.

  Args:
    cfg, params: the model (model.init / convert.load_hf).
    prompts: a list of B token lists (any lengths), or int tokens [B, P] with `prompt_mask`.
    config: GenerateConfig (default GenerateConfig()).
    prompt_mask: bool [B, P] (arrays only): True on prompt tokens; each row's masked-in tokens,
      in order, are its prompt (typically left-padded, as data.PromptBatch). Default: all True.
    key: PRNG key (or int seed) for sampling; required unless greedy.
    row_ids: int [B] row identities for the per-row keys (default 0..B-1); generating prompt i
      alone with row_ids=[i] reproduces its row of a batched call.
    **overrides: GenerateConfig or SamplingConfig fields, e.g. temperature=0, max_new_tokens=64.

  Returns:
    GenerateOutput: tokens / logprobs [B, N], lengths / finish_reasons [B], the left-padded
    prompts [B, P] and their mask and lengths; `.sequences`, `.sequence_mask`, `.completion_mask`.

  `logprobs` are log_softmax(logits / T) over the full vocabulary (T = 1 when greedy), what
  `token_logprobs` gives the trainer, also when top-k / top-p truncated the sampling
  distribution: importance ratios built on them treat the sampler as untruncated (1/Z too large
  for kept mass Z; see m1jax/generate/sampling.py). Use top_k=0, top_p=1 for RL.
  """
  config = config or GenerateConfig()
  sampling_fields = {f.name for f in dataclasses.fields(SamplingConfig)}
  config_fields = {f.name for f in dataclasses.fields(GenerateConfig)}
  unknown = set(overrides) - sampling_fields - config_fields
  if unknown:
    raise ValueError(f"generate: unknown argument(s) {sorted(unknown)}; expected GenerateConfig "
                     f"or SamplingConfig fields")
  sampling_overrides = {k: v for k, v in overrides.items() if k in sampling_fields}
  if sampling_overrides:
    overrides = {k: v for k, v in overrides.items() if k not in sampling_fields}
    overrides["sampling"] = dataclasses.replace(config.sampling, **sampling_overrides)
  config = dataclasses.replace(config, **overrides)
  config.validate_for(cfg)

  if isinstance(prompts, (list, tuple)):
    if prompt_mask is not None:
      raise ValueError("prompt_mask: only for array prompts; token lists carry their lengths")
    tokens, mask = _pack_prompts(prompts, config.pad_multiple, config.pad_id)
  else:
    tokens = jnp.asarray(prompts)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"prompts: expected int tokens [B, P]; got {tokens.dtype} {tokens.shape}")
    mask = (jnp.ones(tokens.shape, bool) if prompt_mask is None
            else jnp.asarray(prompt_mask).astype(bool))
    if mask.shape != tokens.shape:
      raise ValueError(f"prompt_mask: shape {mask.shape} differs from prompts {tokens.shape}")
  tokens_np, mask_np = _on_host(tokens), _on_host(mask)
  if mask_np is not None and not mask_np.any(axis=1).all():
    empty = int(np.flatnonzero(~mask_np.any(axis=1))[0])
    raise ValueError(f"prompt_mask: row {empty} has no prompt token")
  if tokens_np is not None and mask_np is not None:
    bad = mask_np & ((tokens_np < 0) | (tokens_np >= cfg.vocab_size))
    if bad.any():
      raise ValueError(f"prompts: token id {tokens_np[bad][0]} outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
  batch = tokens.shape[0]

  if key is None:
    if not config.sampling.greedy:
      raise ValueError("key: a PRNG key (or int seed) is required when temperature > 0")
    key = 0
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  row_ids = jnp.arange(batch) if row_ids is None else jnp.asarray(row_ids)
  row_ids = row_ids.astype(jnp.int32)
  if row_ids.shape != (batch,):
    raise ValueError(f"row_ids: expected shape ({batch},); got {row_ids.shape}")
  program = _generate_refill_jit if config.slots else _generate_jit
  return program(cfg, config, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), key,
                 row_ids)
