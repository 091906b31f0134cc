"""Tests for m1jax.rl.losses: exact gradients, objective equivalences, aggregation, metrics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl import losses

# fp32 gradients below are a handful of roundings (exp, products, one division) away from the
# float64 closed form: a few ulp, so 2e-6 relative is tight and still robust.
RTOL_FP32 = 2e-6
NON_REINFORCE_KINDS = ("cispo", "ppo", "grpo", "dapo", "gspo", "dr_grpo")


def _grad(cfg, logprobs, old_logprobs, advantages, mask, **kwargs):
  def loss_fn(lp):
    return losses.policy_loss(lp, old_logprobs, advantages, mask, cfg, **kwargs)[0]
  return np.asarray(jax.grad(loss_fn)(logprobs), np.float64)


def _random_batch(seed, batch=6, length=24, log_ratio_std=1.0, per_token_advantages=False):
  """Off-policy batch with padding; padded positions hold -inf / nan to test masking."""
  rng = np.random.default_rng(seed)
  base = -rng.exponential(1.5, (batch, length))
  log_ratio = rng.normal(0.0, log_ratio_std, (batch, length))
  # Both stay valid log-probs (<= 0) and new - old = log_ratio.
  new = base + np.minimum(log_ratio, 0.0)
  old = base - np.maximum(log_ratio, 0.0)
  lengths = rng.integers(length // 2, length + 1, batch)
  lengths[0] = length
  mask = np.arange(length)[None, :] < lengths[:, None]
  new = np.where(mask, new, -np.inf)
  old = np.where(mask, old, np.nan)
  shape = (batch, length) if per_token_advantages else (batch,)
  advantages = rng.normal(0.0, 1.0, shape)
  advantages[0] = np.abs(advantages[0])
  advantages[1] = -np.abs(advantages[1])
  as32 = lambda x: jnp.asarray(x, jnp.float32)
  return as32(new), as32(old), as32(advantages), jnp.asarray(mask)


def _numpy_inputs(logprobs, old_logprobs, advantages, mask):
  """The fp32 inputs in float64, advantages broadcast to [B, T], padding zeroed."""
  mask = np.asarray(mask)
  lp = np.where(mask, np.asarray(logprobs, np.float64), 0.0)
  old = np.where(mask, np.asarray(old_logprobs, np.float64), 0.0)
  adv = np.asarray(advantages, np.float64)
  adv = np.broadcast_to(adv[:, None], lp.shape) if adv.ndim == 1 else adv
  return lp, old, np.where(mask, adv, 0.0), mask


@pytest.mark.parametrize("per_token_advantages", [False, True])
@pytest.mark.parametrize("is_ratio_min", [None, 0.5])
def test_cispo_gradient_is_stop_gradient_weight_times_advantage(per_token_advantages,
                                                                is_ratio_min):
  # d loss / d logprob = -sg(r_hat) A mask / N. Without the stop-gradient an uncapped token's
  # gradient would be -r A (1 + logprob) / N, of opposite sign for logprob < -1; tokens above
  # the cap must keep the capped weight (not a zero gradient).
  inputs = _random_batch(0, per_token_advantages=per_token_advantages)
  cfg = losses.LossConfig(kind="cispo", is_ratio_min=is_ratio_min)
  lp, old, adv, mask = _numpy_inputs(*inputs)
  ratio = np.exp(lp - old)
  low_prob = mask & (lp < -1.0)
  above_cap = mask & (ratio > cfg.is_ratio_cap)
  assert np.sum(low_prob & (adv > 0)) >= 5 and np.sum(low_prob & (adv < 0)) >= 5
  assert np.sum(above_cap) >= 3
  assert np.sum(mask & (ratio < 0.5)) >= 3
  assert not mask.all()

  r_hat = np.clip(ratio, is_ratio_min, cfg.is_ratio_cap)
  expected = -r_hat * adv * mask / mask.sum()
  got = _grad(cfg, *inputs)
  np.testing.assert_allclose(got, expected, rtol=RTOL_FP32, atol=0)
  # The gradient's sign is -sign(A) on low-probability and capped tokens alike.
  assert np.all(np.sign(got[low_prob | above_cap]) == -np.sign(adv[low_prob | above_cap]))


def test_cispo_keeps_gradient_where_ppo_clip_zeroes_it():
  # PPO's gradient is exactly 0 on tokens where the clip is active; CISPO's is non-zero on
  # every unmasked token (exact comparisons: zero is produced exactly by the clip branch).
  inputs = _random_batch(1, log_ratio_std=0.5)
  lp, old, adv, mask = _numpy_inputs(*inputs)
  ratio = np.exp(lp - old)
  clipped = mask & (((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8)))
  assert clipped.sum() >= 10 and (mask & ~clipped).sum() >= 10

  ppo = _grad(losses.LossConfig(kind="ppo", aggregation="token_mean"), *inputs)
  cispo = _grad(losses.LossConfig(kind="cispo"), *inputs)
  assert np.all(ppo[clipped] == 0.0)
  assert np.all(ppo[mask & ~clipped] != 0.0)
  assert np.all(cispo[mask] != 0.0)
  assert np.all(cispo[~mask] == 0.0) and np.all(ppo[~mask] == 0.0)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_objectives_agree_on_policy(aggregation):
  # With old == new (r = 1) every objective reduces to the policy gradient A * grad log pi, so
  # all gradients equal REINFORCE's under the same aggregation (fp32, few-ulp tolerance).
  logprobs, _, advantages, mask = _random_batch(2)
  old = jnp.where(mask, logprobs, 0.0)
  reference = _grad(losses.LossConfig(kind="reinforce", aggregation=aggregation),
                    logprobs, old, advantages, mask)
  assert np.count_nonzero(reference) == np.sum(np.asarray(mask))
  for kind in NON_REINFORCE_KINDS:
    cfg = losses.LossConfig(kind=kind, aggregation=aggregation)
    np.testing.assert_allclose(_grad(cfg, logprobs, old, advantages, mask), reference,
                               rtol=RTOL_FP32, atol=0, err_msg=kind)


@pytest.mark.parametrize("ppo_kind,eps_low,eps_high", [("ppo", 0.2, 0.2), ("dapo", 0.2, 0.28)])
def test_unified_trust_region_mask_reproduces_ppo_clip(ppo_kind, eps_low, eps_high):
  # CISPO with the PPO trust-region mask and no cap has PPO-clip's gradient token for token.
  inputs = _random_batch(3, log_ratio_std=1.0)
  lp, old, adv, mask = _numpy_inputs(*inputs)
  ratio = np.exp(lp - old)
  masked_high = mask & (adv > 0) & (ratio > 1 + eps_high)
  masked_low = mask & (adv < 0) & (ratio < 1 - eps_low)
  assert masked_high.sum() >= 5 and masked_low.sum() >= 5
  eps = dict(clip_eps_low=eps_low, clip_eps_high=eps_high, aggregation="token_mean")
  ppo_cfg = losses.LossConfig(kind=ppo_kind, **eps)
  unified_cfg = losses.LossConfig(kind="cispo", token_mask="ppo_trust_region",
                                  is_ratio_cap=None, **eps)
  ppo = _grad(ppo_cfg, *inputs)
  np.testing.assert_allclose(_grad(unified_cfg, *inputs), ppo, rtol=RTOL_FP32, atol=0)

  _, ppo_metrics = losses.policy_loss(*inputs, ppo_cfg)
  _, unified_metrics = losses.policy_loss(*inputs, unified_cfg)
  expected_frac = (masked_high.sum() + masked_low.sum()) / mask.sum()
  np.testing.assert_allclose(unified_metrics["trust_region_masked_frac"], expected_frac,
                             rtol=1e-6)
  np.testing.assert_allclose(
      ppo_metrics["clip_frac_low"] + ppo_metrics["clip_frac_high"], expected_frac, rtol=1e-6)

  # With the default cap of 5 the two differ only where PPO keeps r > 5 (A < 0): there CISPO's
  # weight is 5 instead of r.
  capped_cfg = losses.LossConfig(kind="cispo", token_mask="ppo_trust_region", **eps)
  capped = _grad(capped_cfg, *inputs)
  above_cap = mask & (ratio > 5.0)
  assert (above_cap & (adv < 0)).sum() >= 2
  np.testing.assert_allclose(capped[~above_cap], ppo[~above_cap], rtol=RTOL_FP32, atol=0)
  np.testing.assert_allclose(capped[above_cap], ppo[above_cap] * 5.0 / ratio[above_cap],
                             rtol=RTOL_FP32, atol=0)


def _aggregation_example():
  """Per-token REINFORCE terms -A * logprob = [[1, 2, 3], [8, -, -], [-, -, -]] (hand-built)."""
  logprobs = jnp.array([[-1.0, -2.0, -3.0], [-4.0, -np.inf, np.nan], [0.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], jnp.float32)
  advantages = jnp.array([1.0, 2.0, 7.0])
  return logprobs, advantages, mask


@pytest.mark.parametrize("aggregation,max_length,expected", [
    ("token_mean", None, (1 + 2 + 3 + 8) / 4),
    ("seq_mean_token_mean", None, (6 / 3 + 8 / 1) / 2),
    ("seq_mean_token_sum", None, (6 + 8) / 2),
    ("seq_mean_token_sum_norm", None, (6 / 3 + 8 / 3) / 2),
    ("seq_mean_token_sum_norm", 4, (6 / 4 + 8 / 4) / 2),
])
def test_aggregation_normalises_as_documented(aggregation, max_length, expected):
  # Hand-computed; the empty third row is left out of the sequence means. Exact up to fp32
  # rounding of a few small sums (1e-6 relative).
  logprobs, advantages, mask = _aggregation_example()
  cfg = losses.LossConfig(kind="reinforce", aggregation=aggregation, max_length=max_length)
  loss, metrics = losses.policy_loss(logprobs, logprobs, advantages, mask, cfg)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["pg_loss"], expected, rtol=1e-6)
  per_token = -advantages[:, None] * logprobs
  np.testing.assert_allclose(
      losses.aggregate(per_token, mask, aggregation, max_length), expected, rtol=1e-6)
  grads = _grad(cfg, logprobs, logprobs, advantages, mask)
  assert np.all(np.isfinite(grads)) and np.all(grads[np.asarray(mask) == 0] == 0.0)


def test_default_aggregation_and_clip_per_kind():
  # The documented defaults, and that explicit values override them.
  expected = {"cispo": "token_mean", "dapo": "token_mean", "reinforce": "token_mean",
              "ppo": "seq_mean_token_mean", "grpo": "seq_mean_token_mean",
              "gspo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm"}
  assert {k: losses.LossConfig(kind=k).effective_aggregation for k in losses.KINDS} == expected
  dapo = losses.LossConfig(kind="dapo")
  assert (dapo.effective_clip_eps_low, dapo.effective_clip_eps_high) == (0.2, 0.28)
  gspo = losses.LossConfig(kind="gspo")
  assert (gspo.effective_clip_eps_low, gspo.effective_clip_eps_high) == (3e-4, 4e-4)
  grpo = losses.LossConfig(kind="grpo", aggregation="token_mean", clip_eps_high=0.3)
  assert grpo.effective_aggregation == "token_mean"
  assert (grpo.effective_clip_eps_low, grpo.effective_clip_eps_high) == (0.2, 0.3)
  cispo = losses.LossConfig()
  assert (cispo.kind, cispo.is_ratio_cap, cispo.is_ratio_min, cispo.token_mask,
          cispo.kl_coef, cispo.entropy_coef) == ("cispo", 5.0, None, "none", 0.0, 0.0)


@pytest.mark.parametrize("kwargs,field", [
    (dict(is_ratio_cap=1.0), "is_ratio_cap"),
    (dict(is_ratio_cap=0.2), "is_ratio_cap"),
    (dict(is_ratio_cap=float("nan")), "is_ratio_cap"),
    (dict(is_ratio_min=1.0), "is_ratio_min"),
    (dict(is_ratio_min=-0.1), "is_ratio_min"),
    (dict(kind="ppo2"), "kind"),
    (dict(aggregation="mean"), "aggregation"),
    (dict(clip_eps_low=-0.1), "clip_eps_low"),
    (dict(kind="dapo", clip_eps_high=-0.28), "clip_eps_high"),
    (dict(kl_coef=-0.01), "kl_coef"),
    (dict(entropy_coef=-0.01), "entropy_coef"),
    (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(token_mask="all"), "token_mask"),
    (dict(kind="grpo", token_mask="ppo_trust_region"), "token_mask"),
    (dict(max_length=0), "max_length"),
])
def test_invalid_config_raises_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    losses.LossConfig(**kwargs)


def test_invalid_call_raises_naming_the_argument():
  logprobs, old, advantages, mask = _random_batch(4, batch=2, length=5)
  with pytest.raises(ValueError, match="ref_logprobs"):
    losses.policy_loss(logprobs, old, advantages, mask, losses.LossConfig(kl_coef=0.1))
  with pytest.raises(ValueError, match="entropy"):
    losses.policy_loss(logprobs, old, advantages, mask, losses.LossConfig(entropy_coef=0.1))
  cfg = losses.LossConfig()
  with pytest.raises(ValueError, match="advantages"):
    losses.policy_loss(logprobs, old, jnp.zeros(3), mask, cfg)
  with pytest.raises(ValueError, match="mask"):
    losses.policy_loss(logprobs, old, advantages, mask[:, :4], cfg)
  with pytest.raises(ValueError, match="logprobs"):
    losses.policy_loss(logprobs[0], old[0], advantages, mask[0], cfg)
  with pytest.raises(ValueError, match="aggregation"):
    losses.aggregate(logprobs, mask, "sum")


def _gspo_batch():
  """Sequence log-ratios placed around GSPO's clip range 1 - 3e-4 .. 1 + 4e-4.

  Rows 1 (A < 0, s < 1 - 3e-4) and 4 (A > 0, s > 1 + 4e-4) are clipped; rows 0 and 5 are
  outside the range on the side the clip ignores; rows 2 and 3 are inside it.
  """
  rng = np.random.default_rng(5)
  batch, length = 6, 24
  offsets = np.array([-2e-3, -2e-3, -1e-4, 1e-4, 2e-3, 2e-3])
  old = -rng.exponential(1.0, (batch, length))
  new = old + offsets[:, None] + rng.normal(0.0, 1e-4, (batch, length))
  lengths = np.array([24, 9, 12, 5, 17, 20])
  mask = np.arange(length)[None, :] < lengths[:, None]
  advantages = np.array([1.0, -1.5, 0.5, -0.7, 1.2, -0.4])
  as32 = lambda x: jnp.asarray(x, jnp.float32)
  return as32(new), as32(old), as32(advantages), jnp.asarray(mask)


def test_gspo_sequence_ratio_is_geometric_mean():
  # Float64 product of token ratios vs the fp32 mean log-ratio: 1e-6 relative.
  logprobs, old, _, mask = _random_batch(6)
  lp, old64, _, mask64 = _numpy_inputs(logprobs, old, jnp.zeros(6), mask)
  ratios = np.exp(lp - old64)
  geometric = np.array([np.prod(r[m]) ** (1 / m.sum()) for r, m in zip(ratios, mask64)])
  got = np.exp(losses.sequence_log_ratio(logprobs, old, mask))
  np.testing.assert_allclose(got, geometric, rtol=1e-6)


def test_gspo_matches_direct_sequence_level_implementation():
  # The paper's sequence-level objective, written directly: mean_i min(s_i A_i, clip(s_i) A_i)
  # with s_i differentiable. Same value and gradient as the GSPO-token form (fp32, 1e-5
  # relative: the two sum in a different order and the loss adds terms of both signs).
  logprobs, old, advantages, mask = _gspo_batch()
  eps_low, eps_high = 3e-4, 4e-4

  def direct(lp):
    m = mask.astype(jnp.float32)
    s = jnp.exp(jnp.sum(m * (lp - old), -1) / jnp.sum(m, -1))
    surrogate = jnp.minimum(s * advantages,
                            jnp.clip(s, 1 - eps_low, 1 + eps_high) * advantages)
    return -jnp.mean(surrogate)

  s = np.exp(np.asarray(losses.sequence_log_ratio(logprobs, old, mask), np.float64))
  adv = np.asarray(advantages)
  clipped = ((adv > 0) & (s > 1 + eps_high)) | ((adv < 0) & (s < 1 - eps_low))
  np.testing.assert_array_equal(clipped, [False, True, False, False, True, False])

  cfg = losses.LossConfig(kind="gspo")
  loss, metrics = losses.policy_loss(logprobs, old, advantages, mask, cfg)
  np.testing.assert_allclose(loss, direct(logprobs), rtol=1e-5)
  got = _grad(cfg, logprobs, old, advantages, mask)
  np.testing.assert_allclose(got, jax.grad(direct)(logprobs), rtol=1e-5, atol=1e-12)
  assert np.all(got[clipped] == 0.0) and np.all(got[~clipped][np.asarray(mask)[~clipped]] != 0)
  np.testing.assert_allclose(metrics["is_weight_max"], s.max(), rtol=1e-6)


def test_gspo_token_gradient_with_per_token_advantages():
  # GSPO-token: d loss / d logprob_t = -s_i A_it [not clipped_it] / (n_i S), with the clip
  # decided per token from s_i and the sign of A_it (closed form in float64, fp32 tolerance).
  logprobs, old, advantages, mask = _gspo_batch()
  rng = np.random.default_rng(7)
  token_adv = np.asarray(advantages)[:, None] * rng.uniform(0.5, 1.5, logprobs.shape)
  token_adv[:, ::3] *= -1
  s = np.exp(np.asarray(losses.sequence_log_ratio(logprobs, old, mask), np.float64))[:, None]
  mask64 = np.asarray(mask)
  clipped = ((token_adv > 0) & (s > 1 + 4e-4)) | ((token_adv < 0) & (s < 1 - 3e-4))
  assert (clipped & mask64).any() and (~clipped & mask64).any()
  n = mask64.sum(-1, keepdims=True)
  expected = -s * token_adv * ~clipped * mask64 / (n * mask64.shape[0])
  got = _grad(losses.LossConfig(kind="gspo"), logprobs, old, jnp.asarray(token_adv, jnp.float32),
              mask)
  np.testing.assert_allclose(got, expected, rtol=RTOL_FP32, atol=0)


def test_metrics_on_hand_built_cispo_example():
  # Ratios [0.25, 0.8, 1, 3, (masked 10)], A = 1, cap 2, min 0.5: hand-computed values.
  ratios = np.array([0.25, 0.8, 1.0, 3.0, 10.0])
  old = np.array([-0.5, -1.0, -2.0, -3.0, -1.0])
  logprobs = jnp.asarray([old + np.log(ratios)], jnp.float32)
  old = jnp.asarray([old], jnp.float32)
  mask = jnp.array([[1, 1, 1, 1, 0]])
  cfg = losses.LossConfig(kind="cispo", is_ratio_cap=2.0, is_ratio_min=0.5)
  loss, metrics = losses.policy_loss(logprobs, old, jnp.array([1.0]), mask, cfg)
  kept = ratios[:4]
  expected = {
      "clip_frac_low": 0.25, "clip_frac_high": 0.25, "trust_region_masked_frac": 0.0,
      "is_weight_mean": (0.5 + 0.8 + 1.0 + 2.0) / 4, "is_weight_min": 0.5,
      "is_weight_max": 2.0, "token_count": 4.0,
      "approx_kl_k3": np.mean(kept - 1 - np.log(kept)),
      "logprob_mean": np.mean(np.asarray(logprobs)[0, :4]),
      "pg_loss": -np.sum(np.array([0.5, 0.8, 1.0, 2.0]) * np.asarray(logprobs)[0, :4]) / 4,
      "kl": 0.0, "kl_loss": 0.0, "entropy": 0.0, "entropy_loss": 0.0,
  }
  assert set(metrics) == set(expected) | {"loss"}
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=0)


def test_metrics_on_hand_built_clip_example():
  # Ratios [0.5, 0.5, 1.5, 1.5, 1], A = [-1, 1, 1, -1, 1], eps 0.2/0.28: PPO clips token 0
  # from below and token 2 from above; the trust-region mask zeroes the same two tokens.
  ratios = np.array([0.5, 0.5, 1.5, 1.5, 1.0])
  logprobs = jnp.asarray([np.log(ratios) - 1.0], jnp.float32)
  old = jnp.full((1, 5), -1.0)
  advantages = jnp.array([[-1.0, 1.0, 1.0, -1.0, 1.0]])
  mask = jnp.ones((1, 5), bool)
  _, dapo = losses.policy_loss(logprobs, old, advantages, mask, losses.LossConfig(kind="dapo"))
  for name, value in {"clip_frac_low": 0.2, "clip_frac_high": 0.2, "is_weight_mean": 1.0,
                      "is_weight_min": 0.5, "is_weight_max": 1.5,
                      "trust_region_masked_frac": 0.0}.items():
    np.testing.assert_allclose(dapo[name], value, rtol=1e-6, err_msg=name)
  # DAPO surrogate by hand: min(rA, clip(r)A) = [-0.8, 0.5, 1.28, -1.5, 1.0], token mean.
  np.testing.assert_allclose(dapo["pg_loss"], -(-0.8 + 0.5 + 1.28 - 1.5 + 1.0) / 5, rtol=1e-6)
  cfg = losses.LossConfig(kind="cispo", token_mask="ppo_trust_region")
  _, unified = losses.policy_loss(logprobs, old, advantages, mask, cfg)
  np.testing.assert_allclose(unified["trust_region_masked_frac"], 0.4, rtol=1e-6)
  np.testing.assert_allclose(unified["clip_frac_high"], 0.0, atol=0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_and_entropy_terms(estimator):
  # Loss parts against float64 closed forms (token_mean): k1 = lp - ref,
  # k3 = e^(ref - lp) - (ref - lp) - 1, and their gradients 1 and 1 - e^(ref - lp).
  # Entropy enters the loss value only (its gradient goes to the entropy argument).
  logprobs, old, advantages, mask = _random_batch(8, log_ratio_std=0.3)
  rng = np.random.default_rng(9)
  ref = jnp.asarray(np.asarray(old) + rng.normal(0.0, 0.3, old.shape), jnp.float32)
  entropy = jnp.asarray(rng.uniform(0.0, 2.0, old.shape), jnp.float32)
  lp, old64, adv, mask64 = _numpy_inputs(logprobs, old, advantages, mask)
  ref64 = np.where(mask64, np.asarray(ref, np.float64), 0.0)
  n = mask64.sum()
  d = ref64 - lp
  token_kl = -d if estimator == "k1" else np.exp(d) - d - 1
  kl_grad = np.ones_like(d) if estimator == "k1" else 1 - np.exp(d)
  expected_kl = np.sum(token_kl * mask64) / n
  expected_entropy = np.sum(np.asarray(entropy) * mask64) / n

  cfg = losses.LossConfig(kind="cispo", kl_coef=0.1, kl_estimator=estimator, entropy_coef=0.01)
  kwargs = dict(ref_logprobs=ref, entropy=entropy)
  loss, metrics = losses.policy_loss(logprobs, old, advantages, mask, cfg, **kwargs)
  np.testing.assert_allclose(metrics["kl"], expected_kl, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_loss"], 0.1 * expected_kl, rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy"], expected_entropy, rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy_loss"], -0.01 * expected_entropy, rtol=1e-5)
  np.testing.assert_allclose(
      loss, metrics["pg_loss"] + metrics["kl_loss"] + metrics["entropy_loss"], rtol=1e-6)

  r_hat = np.minimum(np.exp(lp - old64), 5.0)
  expected_grad = (-r_hat * adv + 0.1 * kl_grad) * mask64 / n
  np.testing.assert_allclose(_grad(cfg, logprobs, old, advantages, mask, **kwargs),
                             expected_grad, rtol=1e-5, atol=1e-9)
  # A zero coefficient keeps the term out of the loss but still reports the KL.
  plain = losses.LossConfig(kind="cispo", kl_estimator=estimator)
  plain_loss, plain_metrics = losses.policy_loss(logprobs, old, advantages, mask, plain,
                                                 ref_logprobs=ref)
  np.testing.assert_allclose(plain_loss, plain_metrics["pg_loss"], rtol=0)
  np.testing.assert_allclose(plain_metrics["kl"], expected_kl, rtol=1e-5)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_empty_mask_gives_zero_loss_and_finite_metrics(kind):
  # No tokens at all: every aggregation returns exactly 0 with a zero (not nan) gradient.
  logprobs, old, advantages, _ = _random_batch(10)
  mask = jnp.zeros(logprobs.shape, bool)
  for aggregation in losses.AGGREGATIONS:
    cfg = losses.LossConfig(kind=kind, aggregation=aggregation, kl_coef=0.1)
    kwargs = dict(ref_logprobs=old, entropy=jnp.ones(logprobs.shape))
    loss, metrics = losses.policy_loss(logprobs, old, advantages, mask, cfg, **kwargs)
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert float(metrics["token_count"]) == 0.0
    assert np.all(_grad(cfg, logprobs, old, advantages, mask, **kwargs) == 0.0)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_jit_matches_eager(kind):
  # Same computation under jit; XLA may fuse differently, so 1e-6 relative.
  inputs = _random_batch(11, per_token_advantages=True)
  cfg = losses.LossConfig(kind=kind)
  jitted = jax.jit(losses.policy_loss, static_argnames="cfg")
  eager_loss, eager_metrics = losses.policy_loss(*inputs, cfg)
  jit_loss, jit_metrics = jitted(*inputs, cfg=cfg)
  np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
  for name in eager_metrics:
    np.testing.assert_allclose(jit_metrics[name], eager_metrics[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  value_and_grad = jax.jit(jax.value_and_grad(
      functools.partial(losses.policy_loss, cfg=cfg), has_aux=True))
  (loss, _), grad = value_and_grad(*inputs)
  assert math.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(grad)))
