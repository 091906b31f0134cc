"""Tests for the rollout correction of m1jax.rl.losses: the factor of every mode against float64
closed forms (capped and masked tokens included), exact gradients for every objective under
every mode, the no-op cases (rollout == old, rollout_correction="none") bit for bit, and
`rollout_metrics` on hand-built examples."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl import losses

MODES = tuple(m for m in losses.ROLLOUT_CORRECTIONS if m != "none")
# The cap 2 and the band [0.5, 2] of the defaults.
CAP, LOW, HIGH = 2.0, 0.5, 2.0


def _batch(seed=0, batch=8, length=12):
  """Off-policy batch whose rollout log-weights log w = old - rollout hit every case.

  Token level: log w ~ N(0, 1) (many tokens above 2 and below 0.5). Sequence level: row sums of
  log w fixed to SEQ_SUMS (above the cap, inside and below the band; the rows of -12 and 10 are
  outside the band also as geometric means). Padding holds nan / -inf.
  """
  rng = np.random.default_rng(seed)
  seq_sums = np.array([-12.0, -3.0, -0.3, 0.2, 0.5, 3.0, 10.0, 0.0])[:batch]
  lengths = rng.integers(length // 2, length + 1, batch)
  lengths[0] = length
  mask = np.arange(length)[None, :] < lengths[:, None]
  noise = rng.normal(0.0, 1.0, (batch, length))
  noise = np.where(mask, noise, 0.0)
  noise -= (noise.sum(-1, keepdims=True) / lengths[:, None]) * mask
  log_w = np.where(mask, noise + (seq_sums / lengths)[:, None], 0.0)
  old = -rng.exponential(1.5, (batch, length)) - np.maximum(log_w, 0.0)
  rollout = old - log_w
  new = old + rng.normal(0.0, 0.5, (batch, length))
  advantages = rng.normal(0.0, 1.0, batch)
  as32 = lambda x: jnp.asarray(x, jnp.float32)
  return (as32(np.where(mask, new, -np.inf)), as32(np.where(mask, old, np.nan)),
          as32(advantages), jnp.asarray(mask), as32(np.where(mask, rollout, np.nan)))


def _log_weights64(level, old, rollout, mask):
  """log w per token, log W per sequence, or log W / n, broadcast to [B, T], in float64."""
  mask = np.asarray(mask)
  log_w = np.where(mask, np.asarray(old, np.float64) - np.asarray(rollout, np.float64), 0.0)
  if level == "sequence":
    log_w = np.broadcast_to(log_w.sum(-1, keepdims=True), log_w.shape)
  elif level == "geometric":
    log_w = np.broadcast_to(log_w.sum(-1, keepdims=True) / mask.sum(-1, keepdims=True),
                            log_w.shape)
  return log_w


def _factor64(mode, old, rollout, mask):
  """The factor of `mode` in float64 from the definitions (docs/rl_objectives.md)."""
  mask = np.asarray(mask)
  level, kind = mode.split("_")
  w = np.exp(_log_weights64(level, old, rollout, mask))
  if kind == "tis":
    factor, capped, masked = np.minimum(w, CAP), w > CAP, np.zeros_like(mask)
  else:
    keep = (w >= LOW) & (w <= HIGH)
    factor, capped, masked = np.where(keep, w, 0.0), np.zeros_like(mask), ~keep
  return np.where(mask, factor, 0.0), capped & mask, masked & mask


def _grad(cfg, logprobs, old, advantages, mask, **kwargs):
  def loss_fn(lp):
    return losses.policy_loss(lp, old, advantages, mask, cfg, **kwargs)[0]
  return np.asarray(jax.grad(loss_fn)(logprobs), np.float64)


def test_the_batch_hits_every_case():
  # The data the other tests rely on: every mode caps or masks some tokens and keeps others.
  _, old, _, mask, rollout = _batch()
  for mode in MODES:
    factor, capped, masked = _factor64(mode, old, rollout, mask)
    acted = capped if mode.endswith("tis") else masked
    assert acted.sum() >= 3 and (np.asarray(mask) & ~acted).sum() >= 3, mode
    assert np.all(factor[np.asarray(mask) & ~acted] > 0)
    # Nothing sits on a boundary within float32 rounding (1e-4 in log w).
    log_w = _log_weights64(mode.split("_")[0], old, rollout, mask)[np.asarray(mask)]
    for bound in (CAP, LOW, HIGH):
      assert not np.any(np.abs(log_w - math.log(bound)) < 1e-4), mode
  assert _factor64("token_mask", old, rollout, mask)[2].sum() >= 3  # below the band too
  low_rows = _factor64("geometric_mask", old, rollout, mask)[0][:, 0] == 0
  assert low_rows.sum() == 2  # the rows of sum -12 and 10


@pytest.mark.parametrize("mode", MODES)
def test_factor_matches_closed_form(mode):
  # float32 log-weights summed over at most 12 tokens of size <= 12: relative error of the
  # factor ~ 12 * 2^-24 * 12 ~ 1e-5 at most, so 2e-5 relative; the flags exactly.
  _, old, _, mask, rollout = _batch()
  cfg = losses.LossConfig(rollout_correction=mode)
  factor, capped, masked = losses.rollout_correction_factor(old, rollout, mask, cfg)
  expected, expected_capped, expected_masked = _factor64(mode, old, rollout, mask)
  np.testing.assert_allclose(factor, expected, rtol=2e-5, atol=0)
  np.testing.assert_array_equal(capped, expected_capped)
  np.testing.assert_array_equal(masked, expected_masked)


@pytest.mark.parametrize("kind", losses.KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_is_factor_times_uncorrected_gradient(kind, mode):
  # Every kind's per-token term depends on its own log-prob only, so the correction scales the
  # gradient token by token: grad = factor * grad(none), factor from the float64 closed form.
  # Zeroed (masked) tokens get exactly 0. fp32: 2e-5 relative (the factor's tolerance above).
  logprobs, old, advantages, mask, rollout = _batch()
  plain = _grad(losses.LossConfig(kind=kind), logprobs, old, advantages, mask)
  cfg = losses.LossConfig(kind=kind, rollout_correction=mode)
  got = _grad(cfg, logprobs, old, advantages, mask, rollout_logprobs=rollout)
  factor, _, masked = _factor64(mode, old, rollout, mask)
  np.testing.assert_allclose(got, factor * plain, rtol=2e-5, atol=1e-12)
  assert np.all(got[masked] == 0.0) and np.all(got[~np.asarray(mask)] == 0.0)
  assert np.all(np.isfinite(got))


@pytest.mark.parametrize("mode", MODES)
def test_cispo_gradient_closed_form(mode):
  # CISPO under a rollout correction: d loss / d logprob = -factor * min(r, 5) * A / N per token
  # (token mean), all in float64 from the inputs; fp32 tolerance 2e-5 as above.
  logprobs, old, advantages, mask, rollout = _batch(1)
  m = np.asarray(mask)
  r = np.exp(np.where(m, np.asarray(logprobs, np.float64) - np.asarray(old, np.float64), 0.0))
  factor, _, _ = _factor64(mode, old, rollout, mask)
  expected = -factor * np.minimum(r, 5.0) * np.asarray(advantages)[:, None] * m / m.sum()
  cfg = losses.LossConfig(kind="cispo", rollout_correction=mode)
  got = _grad(cfg, logprobs, old, advantages, mask, rollout_logprobs=rollout)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-12)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_rollout_equal_to_old_is_no_correction_bit_for_bit(kind):
  # w = 1 on every token: every mode's factor is exactly 1, so loss, gradient and metrics are
  # the uncorrected ones bit for bit. And with rollout_correction="none" rollout_logprobs is
  # ignored (bit for bit too).
  logprobs, old, advantages, mask, rollout = _batch(2)
  kwargs = dict(ref_logprobs=old, entropy=jnp.ones(logprobs.shape))
  base_cfg = losses.LossConfig(kind=kind, kl_coef=0.1)
  loss, metrics = losses.policy_loss(logprobs, old, advantages, mask, base_cfg, **kwargs)
  grad = _grad(base_cfg, logprobs, old, advantages, mask, **kwargs)
  for mode in MODES:
    cfg = losses.LossConfig(kind=kind, kl_coef=0.1, rollout_correction=mode)
    got_loss, got_metrics = losses.policy_loss(logprobs, old, advantages, mask, cfg,
                                               rollout_logprobs=old, **kwargs)
    np.testing.assert_array_equal(got_loss, loss, err_msg=mode)
    assert got_metrics.keys() == metrics.keys()
    for name in metrics:
      np.testing.assert_array_equal(got_metrics[name], metrics[name], err_msg=f"{mode} {name}")
    np.testing.assert_array_equal(
        _grad(cfg, logprobs, old, advantages, mask, rollout_logprobs=old, **kwargs), grad)
  ignored_loss, ignored_metrics = losses.policy_loss(logprobs, old, advantages, mask, base_cfg,
                                                     rollout_logprobs=rollout, **kwargs)
  np.testing.assert_array_equal(ignored_loss, loss)
  for name in metrics:
    np.testing.assert_array_equal(ignored_metrics[name], metrics[name])


@pytest.mark.parametrize("mode", MODES)
def test_jit_matches_eager(mode):
  # Same computation under jit; XLA may fuse differently: 1e-6 relative.
  logprobs, old, advantages, mask, rollout = _batch(3)
  cfg = losses.LossConfig(kind="dapo", rollout_correction=mode)
  eager, _ = losses.policy_loss(logprobs, old, advantages, mask, cfg, rollout_logprobs=rollout)
  jitted = jax.jit(functools.partial(losses.policy_loss, cfg=cfg))
  got, _ = jitted(logprobs, old, advantages, mask, rollout_logprobs=rollout)
  np.testing.assert_allclose(got, eager, rtol=1e-6)
  eager_metrics = losses.rollout_metrics(old, rollout, mask, cfg)
  jit_metrics = jax.jit(functools.partial(losses.rollout_metrics, cfg=cfg))(old, rollout, mask)
  for name, value in eager_metrics.items():
    np.testing.assert_allclose(jit_metrics[name], value, rtol=1e-6, err_msg=name)


def test_config_and_call_errors_name_the_field():
  for kwargs, field in [(dict(rollout_correction="tis"), "rollout_correction"),
                        (dict(rollout_cap=1.0), "rollout_cap"),
                        (dict(rollout_cap=0.28), "rollout_cap"),
                        (dict(rollout_cap=math.inf), "rollout_cap"),
                        (dict(rollout_mask_low=1.0), "rollout_mask_low"),
                        (dict(rollout_mask_low=-0.5), "rollout_mask_low"),
                        (dict(rollout_mask_high=1.0), "rollout_mask_high"),
                        (dict(rollout_mask_high=math.inf), "rollout_mask_high")]:
    with pytest.raises(ValueError, match=field):
      losses.LossConfig(**kwargs)
  logprobs, old, advantages, mask, rollout = _batch()
  cfg = losses.LossConfig(rollout_correction="token_tis")
  with pytest.raises(ValueError, match="rollout_logprobs"):
    losses.policy_loss(logprobs, old, advantages, mask, cfg)
  with pytest.raises(ValueError, match="rollout_logprobs"):
    losses.policy_loss(logprobs, old, advantages, mask, cfg, rollout_logprobs=rollout[:, :3])
  with pytest.raises(ValueError, match="none"):
    losses.rollout_correction_factor(old, rollout, mask, losses.LossConfig())


def test_rollout_metrics_by_hand():
  # Row 0: w = [1, 2, 4] (W = 8); row 1: w = [0.25, (masked)]; cap 2 (token_tis).
  rollout = np.log(np.array([[0.5, 0.2, 0.1], [0.8, 0.3, 0.3]]))
  w = np.array([[1.0, 2.0, 4.0], [0.25, 1.0, 1.0]])
  old = rollout + np.log(w)
  mask = np.array([[True, True, True], [True, False, False]])
  cfg = losses.LossConfig(rollout_correction="token_tis")
  metrics = losses.rollout_metrics(jnp.asarray(old, jnp.float32),
                                   jnp.asarray(rollout, jnp.float32), mask, cfg)
  tokens = np.array([1.0, 2.0, 4.0, 0.25])
  seqs = np.array([8.0, 0.25])
  p_old, p_rollout = np.exp(old)[mask], np.exp(rollout)[mask]
  expected = {
      "rollout_ess_token": tokens.sum() ** 2 / (4 * (tokens ** 2).sum()),
      "rollout_ess_seq": seqs.sum() ** 2 / (2 * (seqs ** 2).sum()),
      "rollout_weight_mean": tokens.mean(), "rollout_weight_min": 0.25,
      "rollout_weight_max": 4.0, "rollout_capped_frac": 0.25, "rollout_masked_frac": 0.0,
      "rollout_abs_log_diff_mean": np.abs(np.log(tokens)).mean(),
      "rollout_abs_log_diff_max": np.log(4.0),
      "rollout_prob_pearson": np.corrcoef(p_old, p_rollout)[0, 1],
  }
  assert set(metrics) == set(expected)
  # float32 logs and exps of small numbers: 1e-5 relative.
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
  masked = losses.rollout_metrics(old, rollout, mask,
                                  losses.LossConfig(rollout_correction="sequence_mask"))
  np.testing.assert_allclose(masked["rollout_masked_frac"], 1.0)  # W = 8 and 0.25: both out
  # On-policy: every weight 1, ESS 1, Pearson 1; no tokens: every metric 0.
  same = losses.rollout_metrics(rollout, rollout, mask)
  for name in ("rollout_ess_token", "rollout_ess_seq", "rollout_weight_min",
               "rollout_weight_max"):
    np.testing.assert_allclose(same[name], 1.0, rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(same["rollout_prob_pearson"], 1.0, rtol=1e-6)
  empty = losses.rollout_metrics(old, rollout, np.zeros_like(mask))
  assert all(float(v) == 0.0 for v in empty.values()), empty


def test_ess_does_not_overflow_for_huge_sequence_weights():
  # Sequence log-weights of 200 and 199 (W ~ e^200 overflows float32): ESS from w / max w,
  # (1 + e^-1)^2 / (2 (1 + e^-2)) exactly in float64; 1e-6 relative.
  rollout = jnp.zeros((2, 4))
  old = jnp.array([[50.0] * 4, [49.75] * 4])
  metrics = losses.rollout_metrics(old, rollout, jnp.ones((2, 4), bool))
  expected = (1 + math.exp(-1)) ** 2 / (2 * (1 + math.exp(-2)))
  np.testing.assert_allclose(metrics["rollout_ess_seq"], expected, rtol=1e-6)
  a = math.exp(-0.25)  # token weights e^50 (4 tokens) and e^49.75 (4 tokens)
  np.testing.assert_allclose(metrics["rollout_ess_token"], (1 + a) ** 2 / (2 * (1 + a * a)),
                             rtol=1e-6)
