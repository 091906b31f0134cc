"""Figure 3: the probability the sampler gives a token against the one the trainer gives it.

The sampler is `m1jax.generate`: a prefill, then one-token decode steps on a KV cache and O(1)
lightning states (the recurrent decode kernel). The trainer is one teacher-forced `model.forward`
over the whole sequence with its padding mask, as m1jax.train.rl runs it (blockwise / Pallas
lightning attention, masked causal softmax attention).
Same weights, same tokens, same compute dtype: only the kernels and the order of the arithmetic
differ, as between the paper's inference and training engines.

`measure` samples the rows once with `generate` (LM head in `sample_head_dtype`), then

  * replays the sampler's path on the sampled tokens (`sampler_hidden`: generate's prefill and
    decode steps, one token at a time) and keeps the final hidden states, every layer's output
    and the MoE experts each fed token was routed to;
  * runs the trainer's forward on `GenerateOutput.sequences` (`trainer_hidden`), same outputs,
    twice: routing as usual, and with MoE routing replay (the response tokens routed to the
    experts the sampler path chose, as `rl.routing_replay` does in training);
  * for each LM-head dtype, applies the LM head to both (`model.lm_head_logits`, the function both
    paths call) and takes the log-probs of the sampled tokens (`generate.token_logprobs`).

Nothing before the LM head depends on its dtype, so one replay serves every head dtype and all of
them score the same tokens: four arms, (bf16 | fp32 head) x (own routing | routing replay).
`MismatchResult.replay_max_abs_dp` checks the sampler-path replay against the log-probs
`generate` itself reported (and `generate_routing_mismatch` its experts against generate's).
`write_report` writes the figure's PNGs, CSVs and tables; experiments/figures/fig3_mismatch.py
is the entry point.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import textwrap
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import config as config_lib
from m1jax import convert, generate, model
from m1jax.analysis import tables as tables_lib
from m1jax.config import DTYPES, ModelConfig
from m1jax.train import driver

HEAD_DTYPES = ("bfloat16", "float32")
# Pearson r of per-token probabilities, training vs inference mode (MiniMax-M1 report, Figure 3).
PAPER_PEARSON = {"bfloat16": 0.987319, "float32": 0.997135}
# Logit standard deviation given to a random LM head (see rescale_lm_head): sampled tokens then
# have probabilities spread over (0, 1) (median ~0.13 at V = 32768, ~0.36 at V = 512).
DEFAULT_LOGIT_STD = 5.0


def random_prompts(vocab_size: int, batch: int, length: int, key: jax.Array) -> jax.Array:
  """Token ids drawn uniformly from [0, vocab_size): int32 [B, P]."""
  return jax.random.randint(key, (batch, length), 0, vocab_size, jnp.int32)


def rescale_lm_head(params: dict[str, Any], logit_std: float) -> tuple[dict[str, Any], float]:
  """Scales the LM head [E, V] so that logits have standard deviation about `logit_std`.

  The final RMSNorm gives hidden states of RMS ~1 (norm weights 1 at init), so logits of a random
  head with entries of standard deviation s have standard deviation ~ s sqrt(E). Random init
  (s = 0.02) gives logits of std 0.64 at E = 1024: next-token distributions are nearly uniform
  over the vocabulary and every sampled token has probability ~1/V. Returns (params, factor).
  """
  if not logit_std > 0:
    raise ValueError(f"logit_std={logit_std!r}: must be positive")
  head = params["lm_head"]
  current = float(jnp.std(head.astype(jnp.float32))) * np.sqrt(head.shape[0])
  factor = logit_std / current
  return {**params, "lm_head": (head * factor).astype(head.dtype)}, factor


def sample(cfg: ModelConfig, params, prompts: jax.Array, *, key: jax.Array, max_new_tokens: int,
           temperature: float = 1.0, head_dtype: str = "float32") -> generate.GenerateOutput:
  """Samples exactly `max_new_tokens` tokens per row (no EOS / early-truncation stops).

  prompts int32 [B, P] (all real tokens). The LM head runs in `head_dtype`.
  """
  return generate.generate(cfg.replace(lm_head_dtype=head_dtype), params, prompts, key=key,
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_token_ids=(), repetition_window=0, record_experts=True)


def _last_token(hidden: jax.Array, hidden_states: Sequence[jax.Array]):
  """Final hidden [B, T, E] and per-layer outputs -> ([B, E], [L, B, E]) at the last position."""
  return hidden[:, -1], jnp.stack([h[:, -1] for h in hidden_states])


@functools.partial(jax.jit, static_argnums=(0,))
def sampler_hidden(cfg: ModelConfig, params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                   tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The sampler's hidden states for `tokens`, computed as generate computes them.

  prompt_tokens int32 [B, P], prompt_mask bool [B, P] (left-padded, GenerateOutput.prompt_*);
  tokens int32 [B, N] the generated tokens. Prefill on the prompt, then decode steps feeding
  token s - 1 at step s, on a cache of P + N - 1 slots (generate's). Returns the final-normed
  hidden states that produced each token, [B, N, E], each layer's output there, [L, B, N, E],
  and the experts each generated token was routed to when fed, int32 [B, N, L, k] (0 for the
  last token, which is never fed).
  """
  # generate's weights, cast once to the compute dtype: on a GPU XLA may keep a float32 weight's
  # extra precision in a fused elementwise use (a norm scale), so the cast changes the rounding.
  params = model.compute_params(cfg, params)
  batch, prompt_width = prompt_tokens.shape
  num_new = tokens.shape[1]
  cache = model.init_cache(cfg, batch, prompt_width + num_new - 1)
  prefill = model.forward(cfg, params, prompt_tokens, token_mask=prompt_mask,
                          positions=model.positions_from_mask(prompt_mask, prompt_tokens.shape),
                          cache=cache, fresh_cache=True, compute_logits=False,
                          return_hidden_states=True)
  first_final, first_layers = _last_token(prefill.hidden, prefill.hidden_states)
  prompt_lengths = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)

  def decode(cache, step):
    last = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)  # [B, 1]
    positions = (prompt_lengths + step - 1)[:, None]
    out = model.forward(cfg, params, last, positions=positions, cache=cache, compute_logits=False,
                        return_hidden_states=True, return_experts=True)
    return out.cache, (*_last_token(out.hidden, out.hidden_states), out.routed_experts[:, 0])

  _, (finals, layers, experts) = jax.lax.scan(decode, prefill.cache, jnp.arange(1, num_new))
  finals = jnp.concatenate([first_final[None], finals])  # [N, B, E]
  layers = jnp.concatenate([first_layers[None], layers])  # [N, L, B, E]
  experts = jnp.concatenate([experts, jnp.zeros_like(experts[:1])])  # [N, B, L, k]
  return jnp.moveaxis(finals, 0, 1), jnp.moveaxis(layers, 0, 2), jnp.moveaxis(experts, 0, 1)


def fed_mask(batch: int, num_new: int) -> jax.Array:
  """bool [B, N]: the generated tokens the sampler fed to the model (all but the last)."""
  return jnp.broadcast_to(jnp.arange(num_new) < num_new - 1, (batch, num_new))


@functools.partial(jax.jit, static_argnums=(0, 4))
def trainer_hidden(cfg: ModelConfig, params, sequences: jax.Array, sequence_mask: jax.Array,
                   prompt_width: int, replay_experts: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The trainer's hidden states: one teacher-forced forward over prompt + completion, with the
  sequence mask, as the RL trainer computes its log-probs.

  sequences int32 [B, P + N], sequence_mask bool [B, P + N] (GenerateOutput.sequences /
  .sequence_mask). replay_experts: optional int [B, N, L, k], the sampler's experts of the
  generated tokens (`sampler_hidden`): the fed ones (`fed_mask`) are routed to them, the
  prompt and the last token as usual. Returns the final-normed hidden states at positions
  P - 1 .. P + N - 2 (those that predict the N generated tokens), [B, N, E], each layer's output
  there, [L, B, N, E], and the experts the generated tokens were routed to, int32 [B, N, L, k].
  """
  replay = None
  if replay_experts is not None:
    batch, num_new = replay_experts.shape[:2]
    prompt = jnp.zeros((batch, prompt_width) + replay_experts.shape[2:], replay_experts.dtype)
    replay = model.RoutingReplay(
        jnp.concatenate([prompt, replay_experts], axis=1),
        jnp.concatenate([jnp.zeros((batch, prompt_width), bool), fed_mask(batch, num_new)], 1))
  out = model.forward(cfg, params, sequences, token_mask=sequence_mask, compute_logits=False,
                      return_hidden_states=True, return_experts=True, routing_replay=replay)
  window = slice(prompt_width - 1, sequences.shape[1] - 1)
  return (out.hidden[:, window], jnp.stack([h[:, window] for h in out.hidden_states]),
          out.routed_experts[:, prompt_width:])


@functools.partial(jax.jit, static_argnums=(0, 4))
def head_logprobs(cfg: ModelConfig, hidden: jax.Array, lm_head: jax.Array, tokens: jax.Array,
                  temperature: float) -> jax.Array:
  """log_softmax(LM head(hidden) / T)[token] with the head in cfg.lm_head_dtype.

  hidden [B, N, E]; lm_head [E, V]; tokens int32 [B, N] -> float32 [B, N].
  """
  logits = model.lm_head_logits(cfg, hidden, lm_head)
  return generate.token_logprobs(logits, tokens, temperature)


@jax.jit
def relative_l2(a: jax.Array, b: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """||a - b|| / ||b|| over the tokens in `mask`, and the largest per-token ratio.

  a, b [..., B, N, E] (any float dtype, compared in float32); mask bool [B, N] -> two arrays [...].
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  weight = mask.astype(jnp.float32)[..., None]
  diff_sq = jnp.sum((a - b) ** 2 * weight, axis=-1)  # [..., B, N]
  ref_sq = jnp.sum(b ** 2 * weight, axis=-1)
  total = jnp.sqrt(jnp.sum(diff_sq, axis=(-2, -1)) / jnp.sum(ref_sq, axis=(-2, -1)))
  per_token = jnp.where(mask, jnp.sqrt(diff_sq / jnp.maximum(ref_sq, jnp.finfo(jnp.float32).tiny)),
                        0.0)
  return total, jnp.max(per_token, axis=(-2, -1))


def routing_mismatch(experts: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per layer, the share of tokens in `mask` whose set of top-k experts differs.

  experts, reference int [B, N, L, k]; mask bool [B, N] -> float64 [L] (0 when mask is empty).
  """
  differ = np.any(np.sort(np.asarray(experts), -1) != np.sort(np.asarray(reference), -1), -1)
  mask = np.asarray(mask)
  return differ[mask].sum(0) / max(int(mask.sum()), 1)


def probability_stats(p_trainer: np.ndarray, p_sampler: np.ndarray,
                      threshold: float = 0.01) -> dict[str, float]:
  """Agreement of two probability vectors [n]: Pearson r, mean / max |dp|, share above threshold."""
  p_trainer, p_sampler = np.asarray(p_trainer, np.float64), np.asarray(p_sampler, np.float64)
  if p_trainer.shape != p_sampler.shape or p_trainer.ndim != 1 or not p_trainer.size:
    raise ValueError(f"p_trainer {p_trainer.shape}, p_sampler {p_sampler.shape}: expected two "
                     "non-empty vectors of one length")
  abs_dp = np.abs(p_sampler - p_trainer)
  return {"n_tokens": int(p_trainer.size),
          "pearson_r": float(np.corrcoef(p_trainer, p_sampler)[0, 1]),
          "mean_abs_dp": float(abs_dp.mean()), "max_abs_dp": float(abs_dp.max()),
          "frac_abs_dp_gt_threshold": float(np.mean(abs_dp > threshold))}


ROUTINGS = (False, True)  # the trainer's own routing, MoE routing replay


@dataclasses.dataclass(frozen=True)
class MismatchResult:
  """Sampler vs trainer on one batch of sampled rows: B rows, N generated tokens, L layers.

  The trainer is measured twice: routing as usual and with MoE routing replay (`routing_replay`
  arguments True), the fed generated tokens routed to the sampler's experts.
  """
  tokens: np.ndarray  # int32 [B, N]: the sampled tokens
  mask: np.ndarray  # bool [B, N]: generated tokens (all True: no stop rules)
  sampler_logprobs: dict[str, np.ndarray]  # LM-head dtype -> float32 [B, N]
  trainer_logprobs: dict[str, np.ndarray]  # LM-head dtype -> float32 [B, N]
  generate_logprobs: np.ndarray  # float32 [B, N]: what generate reported (sample_head_dtype)
  sample_head_dtype: str
  layer_rel_l2: np.ndarray  # [L]: ||h_sampler - h_trainer|| / ||h_trainer|| of each layer's output
  layer_max_token_rel_l2: np.ndarray  # [L]: the same ratio for the worst single token
  final_rel_l2: float  # the same for the final-normed hidden state (the LM head's input)
  final_max_token_rel_l2: float
  is_lightning: tuple[bool, ...]  # [L]
  # The same four quantities and log-probs with routing replay in the trainer.
  replay_trainer_logprobs: dict[str, np.ndarray]
  replay_layer_rel_l2: np.ndarray
  replay_layer_max_token_rel_l2: np.ndarray
  replay_final_rel_l2: float
  replay_final_max_token_rel_l2: float
  # [L]: share of fed generated tokens the trainer (own routing) routes to another expert set
  # than the sampler; 0 with routing replay by construction.
  routing_mismatch: np.ndarray
  # share of (fed token, layer) pairs where generate's recorded experts and the sampler-path
  # replay's differ (the replay check for the routing; 0 when the replay is exact).
  generate_routing_mismatch: float

  @property
  def head_dtypes(self) -> tuple[str, ...]:
    return tuple(self.sampler_logprobs)

  @property
  def arms(self) -> tuple[tuple[str, bool], ...]:
    """(LM-head dtype, routing replay) of every measured arm."""
    return tuple((dtype, replay) for replay in ROUTINGS for dtype in self.head_dtypes)

  def probabilities(self, head_dtype: str,
                    routing_replay: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(trainer, sampler) probabilities of the generated tokens, [n] each, row-major order."""
    if head_dtype not in self.sampler_logprobs:
      raise ValueError(f"head_dtype={head_dtype!r}: measured {self.head_dtypes}")
    trainer = self.replay_trainer_logprobs if routing_replay else self.trainer_logprobs
    return (np.exp(trainer[head_dtype][self.mask]),
            np.exp(self.sampler_logprobs[head_dtype][self.mask]))

  def stats(self, head_dtype: str, threshold: float = 0.01,
            routing_replay: bool = False) -> dict[str, float]:
    return probability_stats(*self.probabilities(head_dtype, routing_replay), threshold=threshold)

  def layer_stats(self, routing_replay: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(relative L2 difference, worst token's) per layer then the final norm, [L + 1] each."""
    if routing_replay:
      return (np.append(self.replay_layer_rel_l2, self.replay_final_rel_l2),
              np.append(self.replay_layer_max_token_rel_l2, self.replay_final_max_token_rel_l2))
    return (np.append(self.layer_rel_l2, self.final_rel_l2),
            np.append(self.layer_max_token_rel_l2, self.final_max_token_rel_l2))

  @property
  def replay_max_abs_dp(self) -> float:
    """max |p| difference between generate's reported probabilities and the replay's: ~0 when
    `sampler_hidden` computes what the sampler computed."""
    replay = self.sampler_logprobs[self.sample_head_dtype][self.mask]
    return float(np.max(np.abs(np.exp(self.generate_logprobs[self.mask]) - np.exp(replay))))


def measure(cfg: ModelConfig, params, prompts: jax.Array, *, key: jax.Array, max_new_tokens: int,
            temperature: float = 1.0, head_dtypes: Sequence[str] = HEAD_DTYPES,
            sample_head_dtype: str = "float32") -> MismatchResult:
  """Samples once, then scores the sampled tokens the sampler's way and the trainer's way (own
  routing, and routing replay).

  prompts int32 [B, P]; key: the sampling key. See the module docstring for the method.
  """
  checked = [("sample_head_dtype", sample_head_dtype)] + [("head_dtypes", d) for d in head_dtypes]
  for name, value in checked:
    if value not in DTYPES:
      raise ValueError(f"{name}: {value!r} is not one of {sorted(DTYPES)}")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r}: must be positive (sampled tokens, not greedy)")
  batch, prompt_width = prompts.shape
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  bools = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bool_)
  experts_shape = ints(batch, max_new_tokens, cfg.num_hidden_layers, cfg.num_experts_per_tok)
  # The replay and the trainer forwards compile on other threads while generate compiles and
  # runs (XLA compiles without holding the GIL).
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    sampler_fn = pool.submit(lambda: sampler_hidden.lower(
        cfg, params, ints(batch, prompt_width), bools(batch, prompt_width),
        ints(batch, max_new_tokens)).compile())
    width = prompt_width + max_new_tokens
    trainer_fn = pool.submit(lambda: trainer_hidden.lower(
        cfg, params, ints(batch, width), bools(batch, width), prompt_width).compile())
    replay_fn = pool.submit(lambda: trainer_hidden.lower(
        cfg, params, ints(batch, width), bools(batch, width), prompt_width,
        experts_shape).compile())
    out = sample(cfg, params, prompts, key=key, max_new_tokens=max_new_tokens,
                 temperature=temperature, head_dtype=sample_head_dtype)
    s_final, s_layers, s_experts = sampler_fn.result()(params, out.prompt_tokens, out.prompt_mask,
                                                       out.tokens)
    t_final, t_layers, t_experts = trainer_fn.result()(params, out.sequences, out.sequence_mask)
    r_final, r_layers, _ = replay_fn.result()(params, out.sequences, out.sequence_mask, s_experts)
  mask = out.completion_mask
  fed = np.asarray(fed_mask(batch, max_new_tokens))
  layer_rel, layer_max = relative_l2(s_layers, t_layers, mask)
  final_rel, final_max = relative_l2(s_final, t_final, mask)
  replay_layer_rel, replay_layer_max = relative_l2(s_layers, r_layers, mask)
  replay_final_rel, replay_final_max = relative_l2(s_final, r_final, mask)
  dtypes = tuple(dict.fromkeys(tuple(head_dtypes) + (sample_head_dtype,)))
  sampler_lp, trainer_lp, replay_lp = {}, {}, {}
  for dtype in dtypes:
    head_cfg = cfg.replace(lm_head_dtype=dtype)
    score = lambda hidden: np.asarray(head_logprobs(head_cfg, hidden, params["lm_head"],
                                                    out.tokens, temperature))
    sampler_lp[dtype], trainer_lp[dtype], replay_lp[dtype] = (
        score(s_final), score(t_final), score(r_final))
  return MismatchResult(
      tokens=np.asarray(out.tokens), mask=np.asarray(mask), sampler_logprobs=sampler_lp,
      trainer_logprobs=trainer_lp, generate_logprobs=np.asarray(out.logprobs),
      sample_head_dtype=sample_head_dtype, layer_rel_l2=np.asarray(layer_rel),
      layer_max_token_rel_l2=np.asarray(layer_max), final_rel_l2=float(final_rel),
      final_max_token_rel_l2=float(final_max), is_lightning=cfg.is_lightning,
      replay_trainer_logprobs=replay_lp, replay_layer_rel_l2=np.asarray(replay_layer_rel),
      replay_layer_max_token_rel_l2=np.asarray(replay_layer_max),
      replay_final_rel_l2=float(replay_final_rel),
      replay_final_max_token_rel_l2=float(replay_final_max),
      routing_mismatch=routing_mismatch(t_experts, s_experts, fed),
      generate_routing_mismatch=float(np.mean(routing_mismatch(out.experts, s_experts, fed))))


def load_model(*, preset: str = "small", dtype: str = "bfloat16", hf_dir: str = "",
               params_from: str = "", logit_std: float | None = None,
               seed: int = 0) -> tuple[ModelConfig, Any, str]:
  """The model to measure, in compute dtype `dtype`: a HF checkpoint, a training stage, or random.

  hf_dir: a directory written by convert.save_hf. params_from: a stage directory of
  experiments/train.py (m1jax.train.driver.stage_params). Neither: config.preset(preset) with random weights
  (seed) and the LM head rescaled to logits of standard deviation `logit_std` (default
  DEFAULT_LOGIT_STD; rescale_lm_head says why); logit_std applies to random weights only.
  Returns (cfg, params, a one-line description of the weights).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPES)}")
  if hf_dir and params_from:
    raise ValueError(f"hf_dir={hf_dir!r} and params_from={params_from!r}: give at most one")
  if (hf_dir or params_from) and logit_std is not None:
    raise ValueError(f"logit_std={logit_std!r}: only for random weights; a checkpoint's LM head "
                     "is used as it is")
  if hf_dir:
    cfg, params = convert.load_hf(hf_dir, dtype=dtype)
    return cfg, params, f"HF checkpoint {hf_dir}"
  if params_from:
    cfg, params = driver.stage_params(params_from)
    return cfg.replace(dtype=dtype), params, f"training stage {params_from}"
  cfg = config_lib.preset(preset, dtype=dtype)
  logit_std = DEFAULT_LOGIT_STD if logit_std is None else logit_std
  params, factor = rescale_lm_head(model.init(cfg, jax.random.key(seed)), logit_std)
  return cfg, params, (f"random init (seed {seed}, std {cfg.initializer_range}), LM head scaled "
                       f"x{factor:.2f} to logits of std {logit_std:g}")


# --- report: PNGs, CSVs and markdown tables -------------------------------------------------------

def _layer_names(result: MismatchResult) -> list[tuple[str, str]]:
  """(layer, kind) per row of the layer table: every layer, then the final norm."""
  rows = [(str(i), "lightning" if lightning else "softmax")
          for i, lightning in enumerate(result.is_lightning)]
  return rows + [("final_norm", "final RMSNorm (LM head input)")]


def _arm_name(head_dtype: str, routing_replay: bool) -> str:
  return f"{head_dtype} head" + (", routing replay" if routing_replay else "")


def tables(result: MismatchResult, threshold: float = 0.01) -> str:
  """Markdown: per arm (LM-head dtype x routing) agreement, ours next to the paper's Pearson r
  (measured without routing replay); per layer, both routings and the routing mismatch."""
  rows = []
  for dtype, replay in result.arms:
    s = result.stats(dtype, threshold, replay)
    paper = f"{PAPER_PEARSON[dtype]:.6f}" if dtype in PAPER_PEARSON and not replay else "-"
    rows.append([dtype, "replay" if replay else "own", s["n_tokens"], f"{s['pearson_r']:.6f}",
                 f"{1 - s['pearson_r']:.3g}", paper, f"{s['mean_abs_dp']:.3g}",
                 f"{s['max_abs_dp']:.3g}", f"{s['frac_abs_dp_gt_threshold']:.4f}"])
  summary = tables_lib.markdown_table(
      ["LM head", "trainer routing", "tokens", "Pearson r", "1 - r", "paper Pearson r",
       "mean abs dp", "max abs dp", f"share abs dp > {threshold:g}"], rows)
  (rel, worst), (replay_rel, replay_worst) = result.layer_stats(False), result.layer_stats(True)
  flips = [f"{f:.3g}" for f in result.routing_mismatch] + ["-"]
  layers = tables_lib.markdown_table(
      ["layer", "kind", "rel L2 diff", "worst token", "rel L2 diff (replay)",
       "worst token (replay)", "share routed differently"],
      [[name, kind, f"{r:.3g}", f"{w:.3g}", f"{rr:.3g}", f"{rw:.3g}", flip]
       for (name, kind), r, w, rr, rw, flip in zip(_layer_names(result), rel, worst, replay_rel,
                                                   replay_worst, flips)])
  return "\n\n".join([
      "Per-token probability of the sampled token, trainer (full forward; routing as usual, or "
      "replaying the sampler's experts) vs sampler (incremental decode):\n\n" + summary,
      "Hidden-state difference, sampler vs trainer, over the generated tokens "
      "(||h_sampler - h_trainer|| / ||h_trainer||; worst token: the same ratio for one token), "
      "and the share of generated tokens the trainer routes to another set of experts than the "
      "sampler (own routing):\n\n" + layers,
      f"Replay check: max |p| difference between generate's reported probabilities and the "
      f"replayed sampler path ({result.sample_head_dtype} LM head): "
      f"{result.replay_max_abs_dp:.3g}; share of (token, layer) routed differently by the "
      f"replayed path than by generate: {result.generate_routing_mismatch:.3g}.",
  ])


def plot_probabilities(result: MismatchResult, path: str, title: str = "") -> None:
  """Scatter of sampler vs trainer probability, one panel per arm (rows: the trainer's own
  routing, routing replay; columns: LM-head dtype), coloured by |dp|."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top

  dtypes = result.head_dtypes
  pairs = {arm: result.probabilities(*arm) for arm in result.arms}
  floor = 1e-7  # |dp| below this (float32 rounding of p) gets the lowest colour
  top = max(floor * 10, max(float(np.max(np.abs(s - t))) for t, s in pairs.values()))
  norm = colors.LogNorm(vmin=floor, vmax=top)
  fig, axes = plt.subplots(len(ROUTINGS), len(dtypes),
                           figsize=(5 * len(dtypes) + 1.5, 5 * len(ROUTINGS) + 0.6),
                           squeeze=False, layout="constrained")
  for (dtype, replay), (p_trainer, p_sampler) in pairs.items():
    ax = axes[ROUTINGS.index(replay)][dtypes.index(dtype)]
    abs_dp = np.maximum(np.abs(p_sampler - p_trainer), floor)
    order = np.argsort(abs_dp)  # largest differences drawn last, on top
    points = ax.scatter(p_trainer[order], p_sampler[order], c=abs_dp[order], norm=norm,
                        cmap="viridis", s=6, linewidths=0)
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.7, linestyle=":")
    paper = (f" (paper {PAPER_PEARSON[dtype]:.6f})"
             if dtype in PAPER_PEARSON and not replay else "")
    r = result.stats(dtype, routing_replay=replay)["pearson_r"]
    ax.set_title(f"{_arm_name(dtype, replay)}\nPearson r = {r:.6f}{paper}", fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="trainer probability (full forward)",
           ylabel="sampler probability (incremental decode)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
  fig.colorbar(points, ax=list(axes.ravel()), label="|p_sampler - p_trainer|")
  if title:
    fig.suptitle(textwrap.fill(title, 130), fontsize=8)
  fig.savefig(path, dpi=150)
  plt.close(fig)


def plot_layers(result: MismatchResult, path: str,
                title: str = "Sampler vs trainer hidden states by layer") -> None:
  """Relative hidden-state difference by layer (trainer's own routing and routing replay),
  lightning and softmax layers marked; below, the share of tokens routed differently."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  num_layers = len(result.is_lightning)
  x = np.arange(num_layers + 1)
  floor = 1e-9  # exact agreement (0) drawn at the floor of the log axis
  fig, (ax, flips) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
  kinds = np.append(np.asarray(result.is_lightning, int), 2)  # 1 lightning, 0 softmax, 2 final
  exact = False
  for replay, color in ((False, "black"), (True, "tab:purple")):
    rel, worst = result.layer_stats(replay)
    exact |= bool((rel == 0).any())
    label = "routing replay" if replay else "own routing"
    ax.plot(x, np.maximum(rel, floor), color=color, linewidth=0.8,
            label=f"{label}, over all generated tokens")
    ax.plot(x, np.maximum(worst, floor), color=color, linewidth=0.8, linestyle="--",
            label=f"{label}, worst token")
    for kind, marker, marker_color, kind_label in ((1, "o", "tab:blue", "lightning layer"),
                                                   (0, "s", "tab:red", "softmax layer"),
                                                   (2, "D", "tab:green", "final RMSNorm")):
      chosen = kinds == kind
      if chosen.any():
        ax.scatter(x[chosen], np.maximum(rel[chosen], floor), marker=marker, color=marker_color,
                   zorder=3, label=None if replay else kind_label)
  ax.set_yscale("log")
  ax.set_ylabel("||h_sampler - h_trainer|| / ||h_trainer||")
  if exact:
    title = f"{title} (exact agreement drawn at {floor:g})"
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  flips.bar(x[:-1], result.routing_mismatch, color="tab:gray")
  flips.set_ylabel("share routed\ndifferently (own routing)", fontsize=7)
  flips.set_xticks(x, [str(i) for i in range(num_layers)] + ["final"], fontsize=7)
  flips.set_xlabel("layer")
  flips.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def write_report(result: MismatchResult, out_dir: str, description: str = "",
                 threshold: float = 0.01) -> str:
  """Writes to out_dir: fig3_mismatch.png, fig3_layers.png, fig3_pairs.csv (every generated
  token under every arm), fig3_summary.csv, fig3_layers.csv, fig3_tables.md. Returns the
  markdown (`description` first)."""
  os.makedirs(out_dir, exist_ok=True)
  rows, steps = np.nonzero(result.mask)
  pairs = []
  for dtype, replay in result.arms:
    p_trainer, p_sampler = result.probabilities(dtype, replay)
    pairs += [[dtype, int(replay), b, s, result.tokens[b, s], f"{pt:.9g}", f"{ps:.9g}",
               f"{abs(ps - pt):.6g}"] for b, s, pt, ps in zip(rows, steps, p_trainer, p_sampler)]
  tables_lib.write_csv(os.path.join(out_dir, "fig3_pairs.csv"),
                       ["lm_head_dtype", "routing_replay", "row", "step", "token", "p_trainer",
                        "p_sampler", "abs_dp"], pairs)
  summary = []
  for dtype, replay in result.arms:
    s = result.stats(dtype, threshold, replay)
    paper = "" if replay else PAPER_PEARSON.get(dtype, "")
    summary.append([dtype, int(replay), s["n_tokens"], f"{s['pearson_r']:.9g}", paper,
                    f"{s['mean_abs_dp']:.6g}", f"{s['max_abs_dp']:.6g}",
                    f"{s['frac_abs_dp_gt_threshold']:.6g}"])
  tables_lib.write_csv(os.path.join(out_dir, "fig3_summary.csv"),
                       ["lm_head_dtype", "routing_replay", "n_tokens", "pearson_r",
                        "paper_pearson_r", "mean_abs_dp", "max_abs_dp",
                        f"frac_abs_dp_gt_{threshold:g}"], summary)
  (rel, worst), (replay_rel, replay_worst) = result.layer_stats(False), result.layer_stats(True)
  flips = [f"{f:.6g}" for f in result.routing_mismatch] + [""]
  tables_lib.write_csv(os.path.join(out_dir, "fig3_layers.csv"),
                       ["layer", "kind", "rel_l2", "max_token_rel_l2", "replay_rel_l2",
                        "replay_max_token_rel_l2", "routing_mismatch"],
                       [[name, kind.split(" ")[0], f"{r:.6g}", f"{w:.6g}", f"{rr:.6g}",
                         f"{rw:.6g}", flip]
                        for (name, kind), r, w, rr, rw, flip in zip(
                            _layer_names(result), rel, worst, replay_rel, replay_worst, flips)])
  plot_probabilities(result, os.path.join(out_dir, "fig3_mismatch.png"), description)
  plot_layers(result, os.path.join(out_dir, "fig3_layers.png"))
  text = "\n\n".join(([description] if description else []) + [tables(result, threshold)])
  with open(os.path.join(out_dir, "fig3_tables.md"), "w") as f:
    f.write(text + "\n")
  return text
