"""Policy-gradient objectives for RL on language models, as pure functions of token log-probs.

`policy_loss` evaluates one objective, chosen by `LossConfig.kind`, on a batch of sampled
responses. All inputs are per-token arrays `[B, T]` (B responses, T response positions);
`mask` marks the positions that count. The function is pure and jit-able (pass the config as a
static argument or close over it); gradients flow to `logprobs` (and to `entropy`, when
given), never to the old or reference log-probs or the advantages.

Kinds (docs/rl_objectives.md has the formulas and references):
  cispo      sg(clip(r, is_ratio_min, is_ratio_cap)) * A * log pi: every token keeps a gradient.
             token_mask="ppo_trust_region" gives the paper's unified form (eq. 6-7).
  ppo, grpo  min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), symmetric eps 0.2 by default.
  dapo       the same surrogate with clip-higher (eps_low 0.2, eps_high 0.28).
  dr_grpo    the same surrogate, eps 0.2, summed per sequence over a constant max length.
  gspo       the surrogate on the sequence ratio exp(mean_t log r_t), GSPO-token gradient form.
  reinforce  A * log pi, no ratio (on-policy).

Default aggregation per kind (override with `LossConfig.aggregation`):
  cispo, dapo, reinforce: token_mean;  ppo, grpo, gspo: seq_mean_token_mean;
  dr_grpo: seq_mean_token_sum_norm.

Rollout correction (`LossConfig.rollout_correction`, with `rollout_logprobs`): when the old
policy's log-probs are the trainer's own and the sampled tokens came from another policy (the
sampler's kernels, or older parameters), every kind's per-token term is multiplied by a
stop-gradient factor built from w = pi_old / pi_rollout: truncated (TIS) or masked (MIS), per
token, per sequence (the product of w) or per sequence as the geometric mean. `rollout_metrics`
summarises the weights (effective sample size, extremes, Pearson r of the probabilities).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

KINDS = ("cispo", "ppo", "grpo", "dapo", "gspo", "dr_grpo", "reinforce")
AGGREGATIONS = (
    "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
TOKEN_MASKS = ("none", "ppo_trust_region")
KL_ESTIMATORS = ("k1", "k3")
ROLLOUT_CORRECTIONS = ("none", "token_tis", "sequence_tis", "geometric_tis", "token_mask",
                       "sequence_mask", "geometric_mask")

DEFAULT_AGGREGATION = {
    "cispo": "token_mean",
    "dapo": "token_mean",
    "reinforce": "token_mean",
    "ppo": "seq_mean_token_mean",
    "grpo": "seq_mean_token_mean",
    "gspo": "seq_mean_token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}
# (eps_low, eps_high). For cispo they only define the optional trust-region mask; reinforce
# ignores them.
DEFAULT_CLIP_EPS = {
    "cispo": (0.2, 0.28),
    "dapo": (0.2, 0.28),
    "reinforce": (0.2, 0.2),
    "ppo": (0.2, 0.2),
    "grpo": (0.2, 0.2),
    "dr_grpo": (0.2, 0.2),
    "gspo": (3e-4, 4e-4),
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which objective `policy_loss` evaluates, and its hyper-parameters.

  Attributes:
    kind: one of KINDS.
    aggregation: one of AGGREGATIONS; None takes the kind's default (DEFAULT_AGGREGATION).
    max_length: the constant length of "seq_mean_token_sum_norm"; None uses T, the padded
      response length of the batch. Ignored by the other aggregations.
    clip_eps_low: ratio clip 1 - eps_low of the PPO-family kinds and of the cispo trust-region
      mask; None takes the kind's default (DEFAULT_CLIP_EPS). Must be >= 0.
    clip_eps_high: ratio clip 1 + eps_high, same rules as clip_eps_low.
    is_ratio_cap: cispo only. Absolute upper bound on the importance-sampling weight
      r = pi / pi_old (not 1 + eps): r_hat = min(r, is_ratio_cap). Must be > 1; None: no cap.
    is_ratio_min: cispo only. Absolute lower bound on r, in [0, 1); None (default): no bound.
    token_mask: cispo only. "none" (CISPO) or "ppo_trust_region" (drop tokens with A > 0 and
      r > 1 + eps_high, or A < 0 and r < 1 - eps_low).
    kl_coef: weight of the KL penalty to a reference policy (needs `ref_logprobs`). >= 0.
    kl_estimator: "k1" (log pi - log pi_ref) or "k3" (pi_ref/pi - log(pi_ref/pi) - 1).
    entropy_coef: weight of the entropy bonus (needs `entropy`). >= 0.
    rollout_correction: one of ROLLOUT_CORRECTIONS (needs `rollout_logprobs` unless "none").
      With w = pi_old / pi_rollout per token, W = prod_t w (sequence) or (prod_t w)^(1/n)
      (geometric): *_tis multiplies each token's term by min(w or W, rollout_cap); *_mask by
      w or W inside [rollout_mask_low, rollout_mask_high] and by 0 outside (the token, or the
      whole sequence). The factor is a constant (stop-gradient).
    rollout_cap: absolute cap C of the *_tis corrections (not 1 + eps), > 1. Default 2.0.
    rollout_mask_low, rollout_mask_high: absolute band of the *_mask corrections; it must
      contain 1: 0 <= low < 1 < high < inf. Defaults 0.5 and 2.0.
  """

  kind: str = "cispo"
  aggregation: str | None = None
  max_length: int | None = None
  clip_eps_low: float | None = None
  clip_eps_high: float | None = None
  is_ratio_cap: float | None = 5.0
  is_ratio_min: float | None = None
  token_mask: str = "none"
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  rollout_correction: str = "none"
  rollout_cap: float = 2.0
  rollout_mask_low: float = 0.5
  rollout_mask_high: float = 2.0

  def __post_init__(self):
    _check_choice("kind", self.kind, KINDS)
    if self.aggregation is not None:
      _check_choice("aggregation", self.aggregation, AGGREGATIONS)
    _check_choice("token_mask", self.token_mask, TOKEN_MASKS)
    _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
    if self.token_mask != "none" and self.kind != "cispo":
      raise ValueError(
          f"LossConfig.token_mask={self.token_mask!r} applies only to kind='cispo' "
          f"(kind={self.kind!r} has its own clipping).")
    if self.max_length is not None and not self.max_length > 0:
      raise ValueError(f"LossConfig.max_length must be > 0 or None, got {self.max_length!r}.")
    for name in ("clip_eps_low", "clip_eps_high"):
      value = getattr(self, name)
      if value is not None and not value >= 0:
        raise ValueError(f"LossConfig.{name} must be >= 0 or None, got {value!r}.")
    if self.is_ratio_cap is not None and not self.is_ratio_cap > 1:
      raise ValueError(
          f"LossConfig.is_ratio_cap is an absolute cap on r = pi/pi_old and must be > 1 "
          f"(e.g. 5.0; a cap of 1 + eps is written as that number), got {self.is_ratio_cap!r}.")
    if self.is_ratio_min is not None and not 0 <= self.is_ratio_min < 1:
      raise ValueError(f"LossConfig.is_ratio_min must be in [0, 1) or None, "
                       f"got {self.is_ratio_min!r}.")
    for name in ("kl_coef", "entropy_coef"):
      value = getattr(self, name)
      if not value >= 0:
        raise ValueError(f"LossConfig.{name} must be >= 0, got {value!r}.")
    _check_choice("rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
    if not 1 < self.rollout_cap < math.inf:
      raise ValueError(
          f"LossConfig.rollout_cap is an absolute cap on w = pi_old/pi_rollout and must be a "
          f"finite number > 1 (e.g. 2.0), got {self.rollout_cap!r}.")
    if not 0 <= self.rollout_mask_low < 1:
      raise ValueError(f"LossConfig.rollout_mask_low must be in [0, 1) (the band keeps w = 1), "
                       f"got {self.rollout_mask_low!r}.")
    if not 1 < self.rollout_mask_high < math.inf:
      raise ValueError(f"LossConfig.rollout_mask_high must be a finite number > 1 (the band "
                       f"keeps w = 1), got {self.rollout_mask_high!r}.")

  @property
  def effective_aggregation(self) -> str:
    return self.aggregation or DEFAULT_AGGREGATION[self.kind]

  @property
  def effective_clip_eps_low(self) -> float:
    low = self.clip_eps_low
    return DEFAULT_CLIP_EPS[self.kind][0] if low is None else low

  @property
  def effective_clip_eps_high(self) -> float:
    high = self.clip_eps_high
    return DEFAULT_CLIP_EPS[self.kind][1] if high is None else high


def _check_choice(field, value, choices):
  if value not in choices:
    raise ValueError(f"LossConfig.{field}={value!r} is not one of {choices}.")


def aggregate(values, mask, aggregation, max_length=None):
  """Reduces per-token values to a scalar.

  Args:
    values: [B, T] per-token values; entries where mask is 0 are ignored.
    mask: [B, T] bool or {0, 1}; 1 marks a token that counts.
    aggregation: one of AGGREGATIONS. With n_i the token count of sequence i, N = sum_i n_i and
      S the number of sequences with n_i > 0 (empty sequences are left out of every mean):
        token_mean:              sum_it v_it / N
        seq_mean_token_mean:     (1/S) sum_i (1/n_i) sum_t v_it
        seq_mean_token_sum:      (1/S) sum_i sum_t v_it
        seq_mean_token_sum_norm: (1/S) sum_i sum_t v_it / max_length
    max_length: constant of seq_mean_token_sum_norm; None uses T.

  Returns:
    float32 scalar; 0 when no token counts.
  """
  _check_choice("aggregation", aggregation, AGGREGATIONS)
  valid = jnp.asarray(mask) > 0
  values = jnp.where(valid, values.astype(jnp.float32), 0.0)
  if aggregation == "token_mean":
    return jnp.sum(values) / jnp.maximum(jnp.sum(valid), 1)
  seq_tokens = jnp.sum(valid, axis=-1)
  seq_sums = jnp.sum(values, axis=-1)
  if aggregation == "seq_mean_token_mean":
    seq_values = seq_sums / jnp.maximum(seq_tokens, 1)
  elif aggregation == "seq_mean_token_sum":
    seq_values = seq_sums
  else:
    seq_values = seq_sums / (values.shape[-1] if max_length is None else max_length)
  num_seqs = jnp.sum(seq_tokens > 0)
  return jnp.sum(seq_values) / jnp.maximum(num_seqs, 1)


def sequence_log_ratio(logprobs, old_logprobs, mask):
  """Mean token log-ratio of each sequence, log of GSPO's s_i = (pi(o_i) / pi_old(o_i))^(1/|o_i|).

  Args:
    logprobs, old_logprobs: [B, T] token log-probs under the current and the sampling policy.
    mask: [B, T] bool or {0, 1}.

  Returns:
    [B] float32; 0 for a sequence without tokens.
  """
  valid = jnp.asarray(mask) > 0
  log_ratio = jnp.where(valid, logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32),
                        0.0)
  return jnp.sum(log_ratio, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1)


def _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy,
                  rollout_logprobs=None):
  if logprobs.ndim != 2:
    raise ValueError(f"logprobs must be [B, T], got shape {logprobs.shape}.")
  for name, array in (("old_logprobs", old_logprobs), ("mask", mask),
                      ("ref_logprobs", ref_logprobs), ("entropy", entropy),
                      ("rollout_logprobs", rollout_logprobs)):
    if array is not None and array.shape != logprobs.shape:
      raise ValueError(f"{name} must have the shape of logprobs {logprobs.shape}, "
                       f"got {array.shape}.")
  if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
    raise ValueError(f"advantages must be [B] or [B, T] with [B, T] = {logprobs.shape}, "
                     f"got {advantages.shape}.")


def rollout_correction_factor(old_logprobs, rollout_logprobs, mask, cfg: LossConfig):
  """The stop-gradient factor `policy_loss` multiplies each token's term by, and where the cap or
  the band acted.

  Args:
    old_logprobs, rollout_logprobs: [B, T] log-probs of the sampled tokens under the old policy
      (the trainer's) and under the rollout policy that sampled them; w = exp(old - rollout).
    mask: [B, T] bool or {0, 1}.
    cfg: a LossConfig whose rollout_correction is not "none" (LossConfig documents the modes).

  Returns:
    (factor [B, T] float32, capped [B, T] bool, masked [B, T] bool): the factor (0 on masked-out
    positions), the tokens whose weight the TIS cap lowered, the tokens the band zeroed. For the
    sequence and geometric levels every token of a sequence shares its weight and its flags.
  """
  if cfg.rollout_correction == "none":
    raise ValueError("rollout_correction_factor: cfg.rollout_correction is 'none'.")
  valid = jnp.asarray(mask) > 0
  log_w = jnp.where(valid, jnp.asarray(old_logprobs, jnp.float32)
                    - jnp.asarray(rollout_logprobs, jnp.float32), 0.0)
  log_w = jax.lax.stop_gradient(log_w)
  level, mode = cfg.rollout_correction.split("_")
  if level != "token":
    seq_log_w = jnp.sum(log_w, axis=-1, keepdims=True)
    if level == "geometric":
      seq_log_w = seq_log_w / jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
    log_w = jnp.broadcast_to(seq_log_w, log_w.shape)
  no_tokens = jnp.zeros(log_w.shape, bool)
  if mode == "tis":
    log_cap = math.log(cfg.rollout_cap)
    factor = jnp.exp(jnp.minimum(log_w, log_cap))
    capped, masked = valid & (log_w > log_cap), no_tokens
  else:
    log_low = -math.inf if cfg.rollout_mask_low == 0 else math.log(cfg.rollout_mask_low)
    log_high = math.log(cfg.rollout_mask_high)
    keep = (log_w >= log_low) & (log_w <= log_high)
    factor = jnp.where(keep, jnp.exp(jnp.minimum(log_w, log_high)), 0.0)
    capped, masked = no_tokens, valid & ~keep
  return jnp.where(valid, factor, 0.0), capped, masked


def _effective_sample_size(log_weights, valid):
  """(sum w)^2 / (n sum w^2) over the valid entries of [...] log-weights; 0 when none is valid.
  Scale-invariant, so evaluated on w / max w (no overflow)."""
  count = jnp.sum(valid)
  top = jnp.max(jnp.where(valid, log_weights, -jnp.inf))
  w = jnp.where(valid, jnp.exp(log_weights - jnp.where(count > 0, top, 0.0)), 0.0)
  ess = jnp.sum(w) ** 2 / (jnp.maximum(count, 1) * jnp.maximum(jnp.sum(w * w), 1e-30))
  return jnp.where(count > 0, ess, 0.0)


def rollout_metrics(old_logprobs, rollout_logprobs, mask, cfg: LossConfig | None = None):
  """How far the rollout policy is from the old policy on a batch of sampled tokens.

  Args:
    old_logprobs, rollout_logprobs: [B, T], as for `rollout_correction_factor`; w = pi_old /
      pi_rollout per token, W_i = prod_t w the weight of sequence i.
    mask: [B, T] bool or {0, 1}.
    cfg: the objective; its rollout_correction gives the capped / masked fractions (0 when
      None or "none").

  Returns:
    dict of float32 scalars (0 when no token counts):
      rollout_ess_token: (sum w)^2 / (N sum w^2) over the N tokens, in (0, 1]; 1: w constant.
      rollout_ess_seq: the same over the sequence weights W_i of the sequences with tokens.
      rollout_weight_mean, rollout_weight_min, rollout_weight_max: of the token weights w.
      rollout_capped_frac, rollout_masked_frac: share of tokens the TIS cap lowered / the mask
        zeroed under cfg.rollout_correction.
      rollout_abs_log_diff_mean, rollout_abs_log_diff_max: of |log pi_old - log pi_rollout|.
      rollout_prob_pearson: Pearson r of the token probabilities pi_old vs pi_rollout (paper
        Fig. 3's statistic); 0 when either side has no variance.
  """
  valid = jnp.asarray(mask) > 0
  old = jnp.where(valid, jnp.asarray(old_logprobs, jnp.float32), 0.0)
  rollout = jnp.where(valid, jnp.asarray(rollout_logprobs, jnp.float32), 0.0)
  log_w = old - rollout
  count = jnp.sum(valid)
  denominator = jnp.maximum(count, 1).astype(jnp.float32)
  has_tokens = count > 0

  def mean(values):
    return jnp.sum(jnp.where(valid, values, 0.0)) / denominator

  def extreme(values, reduce, identity):
    return jnp.where(has_tokens, reduce(jnp.where(valid, values, identity)), 0.0)

  weights = jnp.exp(log_w)
  seq_valid = jnp.any(valid, axis=-1)
  p_old, p_rollout = jnp.exp(old), jnp.exp(rollout)
  centred_old = jnp.where(valid, p_old - mean(p_old), 0.0)
  centred_rollout = jnp.where(valid, p_rollout - mean(p_rollout), 0.0)
  variance = jnp.sum(centred_old ** 2) * jnp.sum(centred_rollout ** 2)
  pearson = jnp.where(variance > 0, jnp.sum(centred_old * centred_rollout)
                      / jnp.sqrt(jnp.where(variance > 0, variance, 1.0)), 0.0)
  capped = masked = jnp.zeros(valid.shape, bool)
  if cfg is not None and cfg.rollout_correction != "none":
    _, capped, masked = rollout_correction_factor(old, rollout, valid, cfg)
  return {
      "rollout_ess_token": _effective_sample_size(log_w, valid),
      "rollout_ess_seq": _effective_sample_size(jnp.sum(log_w, axis=-1), seq_valid),
      "rollout_weight_mean": mean(weights),
      "rollout_weight_min": extreme(weights, jnp.min, jnp.inf),
      "rollout_weight_max": extreme(weights, jnp.max, -jnp.inf),
      "rollout_capped_frac": mean(capped.astype(jnp.float32)),
      "rollout_masked_frac": mean(masked.astype(jnp.float32)),
      "rollout_abs_log_diff_mean": mean(jnp.abs(log_w)),
      "rollout_abs_log_diff_max": extreme(jnp.abs(log_w), jnp.max, -jnp.inf),
      "rollout_prob_pearson": pearson,
  }


def _clipped_surrogate(ratio, advantages, eps_low, eps_high):
  """PPO's min(r A, clip(r) A) and where each side of the clip is active (zero gradient)."""
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  objective = jnp.minimum(ratio * advantages, clipped * advantages)
  ratio_value = jax.lax.stop_gradient(ratio)
  clip_low = (advantages < 0) & (ratio_value < 1.0 - eps_low)
  clip_high = (advantages > 0) & (ratio_value > 1.0 + eps_high)
  return objective, clip_low, clip_high


def policy_loss(logprobs, old_logprobs, advantages, mask, cfg: LossConfig, *,
                ref_logprobs=None, entropy=None, rollout_logprobs=None):
  """Loss (minus the objective) of one RL objective, and scalar metrics.

  Args:
    logprobs: [B, T] log pi_theta of the sampled tokens; gradients flow to it (and to entropy).
    old_logprobs: [B, T] log-probs of the same tokens under the policy that sampled them;
      a constant (stop-gradient), like advantages and ref_logprobs.
    advantages: [B] (one per response) or [B, T] (per token).
    mask: [B, T] bool or {0, 1}; 1 marks response tokens that count. Values at masked positions
      (including inf or nan) do not reach the loss or the gradient.
    cfg: the objective.
    ref_logprobs: optional [B, T] log-probs under a reference policy, for the KL term; required
      when cfg.kl_coef > 0. When given, the KL value is reported even with kl_coef = 0.
    entropy: optional [B, T] per-token policy entropy; required when cfg.entropy_coef > 0.
    rollout_logprobs: optional [B, T] log-probs of the tokens under the policy that sampled them
      when old_logprobs are the trainer's own (a constant); required when
      cfg.rollout_correction is not "none", which then multiplies every token's term by
      `rollout_correction_factor` (w = pi_old / pi_rollout). Ignored with "none": the loss, its
      gradient and the metrics are exactly those without it.

  Returns:
    (loss, metrics): loss a float32 scalar, loss = pg_loss + kl_coef * kl - entropy_coef *
    entropy, each part reduced with the configured aggregation. metrics is a dict of float32
    scalars (docs/rl_objectives.md); token statistics are over unmasked tokens and are 0 when
    there are none:
      loss, pg_loss, kl_loss, entropy_loss: the loss and its three parts (they add up to loss).
      kl, entropy: the aggregated KL to the reference and entropy (0 when not given).
      clip_frac_low, clip_frac_high: fraction of tokens whose weight the clip changed from below
        / above. cispo: r < is_ratio_min / r > is_ratio_cap. PPO family and gspo: the clip is
        active and the token has no gradient (A < 0, r < 1 - eps_low / A > 0, r > 1 + eps_high).
      trust_region_masked_frac: fraction of tokens zeroed by cispo's ppo_trust_region mask.
      is_weight_mean, is_weight_min, is_weight_max: the importance weight the objective applies:
        cispo r_hat (after the cap), PPO family r, gspo s_i, reinforce 1 (the rollout
        correction's factor comes on top; `rollout_metrics` describes it).
      approx_kl_k3: mean of (r - 1) - log r, the k3 estimate of KL(pi_old || pi_theta).
      logprob_mean: mean of logprobs.  token_count: number of unmasked tokens.
  """
  logprobs, old_logprobs, advantages, mask = (
      jnp.asarray(x) for x in (logprobs, old_logprobs, advantages, mask))
  ref_logprobs = None if ref_logprobs is None else jnp.asarray(ref_logprobs)
  entropy = None if entropy is None else jnp.asarray(entropy)
  correct_rollout = cfg.rollout_correction != "none"
  rollout_logprobs = None if rollout_logprobs is None else jnp.asarray(rollout_logprobs)
  _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, rollout_logprobs)
  if correct_rollout and rollout_logprobs is None:
    raise ValueError(f"LossConfig.rollout_correction={cfg.rollout_correction!r} needs the "
                     f"rollout_logprobs argument.")
  if cfg.kl_coef > 0 and ref_logprobs is None:
    raise ValueError(f"LossConfig.kl_coef={cfg.kl_coef} needs the ref_logprobs argument.")
  if cfg.entropy_coef > 0 and entropy is None:
    raise ValueError(f"LossConfig.entropy_coef={cfg.entropy_coef} needs the entropy argument.")
  aggregation = cfg.effective_aggregation
  eps_low, eps_high = cfg.effective_clip_eps_low, cfg.effective_clip_eps_high
  sg = jax.lax.stop_gradient

  valid = mask > 0
  # Masked positions are replaced before any arithmetic so padding values cannot produce nan.
  logprobs = jnp.where(valid, logprobs.astype(jnp.float32), 0.0)
  old_logprobs = sg(jnp.where(valid, old_logprobs.astype(jnp.float32), 0.0))
  advantages = sg(advantages.astype(jnp.float32))
  if advantages.ndim == 1:
    advantages = jnp.broadcast_to(advantages[:, None], logprobs.shape)
  advantages = jnp.where(valid, advantages, 0.0)
  ratio = jnp.exp(logprobs - old_logprobs)
  no_tokens = jnp.zeros(logprobs.shape, bool)
  trust_region_masked = no_tokens

  if cfg.kind == "cispo":
    ratio_value = sg(ratio)
    is_weight = jnp.clip(ratio_value, cfg.is_ratio_min, cfg.is_ratio_cap)
    objective = is_weight * advantages * logprobs
    clip_low = no_tokens if cfg.is_ratio_min is None else ratio_value < cfg.is_ratio_min
    clip_high = no_tokens if cfg.is_ratio_cap is None else ratio_value > cfg.is_ratio_cap
    if cfg.token_mask == "ppo_trust_region":
      trust_region_masked = (((advantages > 0) & (ratio_value > 1.0 + eps_high))
                             | ((advantages < 0) & (ratio_value < 1.0 - eps_low)))
      objective = jnp.where(trust_region_masked, 0.0, objective)
  elif cfg.kind == "gspo":
    seq_log_ratio = sg(sequence_log_ratio(logprobs, old_logprobs, valid))
    # Value s_i on every token, gradient of the token's own log-prob: s_i * d log pi_t.
    token_ratio = jnp.exp(seq_log_ratio[:, None] + logprobs - sg(logprobs))
    objective, clip_low, clip_high = _clipped_surrogate(
        token_ratio, advantages, eps_low, eps_high)
    is_weight = sg(token_ratio)
  elif cfg.kind == "reinforce":
    objective = advantages * logprobs
    is_weight = jnp.ones_like(logprobs)
    clip_low = clip_high = no_tokens
  else:
    objective, clip_low, clip_high = _clipped_surrogate(ratio, advantages, eps_low, eps_high)
    is_weight = sg(ratio)
  if correct_rollout:
    rollout_logprobs = sg(jnp.where(valid, rollout_logprobs.astype(jnp.float32), 0.0))
    factor, _, _ = rollout_correction_factor(old_logprobs, rollout_logprobs, valid, cfg)
    objective = factor * objective

  pg_loss = aggregate(-objective, valid, aggregation, cfg.max_length)
  zero = jnp.zeros((), jnp.float32)
  kl = zero
  if ref_logprobs is not None:
    ref_log_ratio = sg(jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0)) - logprobs
    if cfg.kl_estimator == "k1":
      token_kl = -ref_log_ratio
    else:
      token_kl = jnp.exp(ref_log_ratio) - ref_log_ratio - 1.0
    kl = aggregate(token_kl, valid, aggregation, cfg.max_length)
  entropy_value = zero
  if entropy is not None:
    entropy_value = aggregate(entropy, valid, aggregation, cfg.max_length)
  # Terms with a zero coefficient stay out of the loss so their values cannot reach it.
  kl_loss = cfg.kl_coef * kl if cfg.kl_coef > 0 else zero
  entropy_loss = -cfg.entropy_coef * entropy_value if cfg.entropy_coef > 0 else zero
  loss = pg_loss + kl_loss + entropy_loss

  token_count = jnp.sum(valid).astype(jnp.float32)
  denominator = jnp.maximum(token_count, 1.0)

  def token_mean(values):
    return jnp.sum(jnp.where(valid, sg(values).astype(jnp.float32), 0.0)) / denominator

  def token_extreme(values, reduce, identity):
    extreme = reduce(jnp.where(valid, values, identity))
    return jnp.where(token_count > 0, extreme, 0.0)

  log_ratio = sg(logprobs - old_logprobs)
  metrics = {
      "loss": sg(loss),
      "pg_loss": sg(pg_loss),
      "kl_loss": sg(kl_loss),
      "entropy_loss": sg(entropy_loss),
      "kl": sg(kl),
      "entropy": sg(entropy_value),
      "clip_frac_low": token_mean(clip_low),
      "clip_frac_high": token_mean(clip_high),
      "trust_region_masked_frac": token_mean(trust_region_masked),
      "is_weight_mean": token_mean(is_weight),
      "is_weight_min": token_extreme(is_weight, jnp.min, jnp.inf),
      "is_weight_max": token_extreme(is_weight, jnp.max, -jnp.inf),
      "approx_kl_k3": token_mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
      "logprob_mean": token_mean(logprobs),
      "token_count": token_count,
  }
  return loss, metrics
