"""Tests for m1jax.rl.advantages on hand-computed examples with unequal, interleaved groups."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl import advantages as adv_lib

# Groups: 0 -> samples {0, 2, 5} rewards [1, 0, 3]; 1 -> {1, 3} rewards [0, 2]; 2 -> {4} [5];
# group 3 is empty (num_groups is an upper bound).
REWARDS = jnp.array([1.0, 0.0, 0.0, 2.0, 5.0, 3.0])
GROUP_IDS = jnp.array([0, 1, 0, 1, 2, 0])
NUM_GROUPS = 4
# Values below are a few fp32 operations from exact: 1e-6 relative, 1e-6 absolute near 0.
TOL = dict(rtol=1e-6, atol=1e-6)


def test_grpo_advantages_sample_std():
  # Group 0: mean 4/3, deviations [-1/3, -4/3, 5/3], sample variance (1 + 16 + 25) / 9 / 2 = 7/3.
  # Group 1: mean 1, deviations [-1, 1], sample std sqrt(2). Group 2 (one sample): 0.
  s0, s1 = math.sqrt(7 / 3), math.sqrt(2)
  expected = [-1 / 3 / s0, -1 / s1, -4 / 3 / s0, 1 / s1, 0.0, 5 / 3 / s0]
  got = adv_lib.grpo_advantages(REWARDS, GROUP_IDS, NUM_GROUPS, eps=0.0)
  np.testing.assert_allclose(got, expected, **TOL)
  # eps enters as std + eps.
  got_eps = adv_lib.grpo_advantages(REWARDS, GROUP_IDS, NUM_GROUPS, eps=0.5)
  np.testing.assert_allclose(got_eps[1], -1 / (s1 + 0.5), **TOL)


def test_grpo_advantages_population_std():
  # ddof=0: group 0 variance 42/9/3 = 14/9, group 1 std 1.
  s0 = math.sqrt(14 / 9)
  expected = [-1 / 3 / s0, -1.0, -4 / 3 / s0, 1.0, 0.0, 5 / 3 / s0]
  got = adv_lib.grpo_advantages(REWARDS, GROUP_IDS, NUM_GROUPS, eps=0.0, ddof=0)
  np.testing.assert_allclose(got, expected, **TOL)


def test_group_mean_and_std_per_sample():
  mean, std = adv_lib.group_mean_and_std(REWARDS, GROUP_IDS, NUM_GROUPS)
  np.testing.assert_allclose(mean, [4 / 3, 1, 4 / 3, 1, 5, 4 / 3], **TOL)
  s0 = math.sqrt(7 / 3)
  np.testing.assert_allclose(std, [s0, math.sqrt(2), s0, math.sqrt(2), 0, s0], **TOL)


def test_dr_grpo_advantages_are_group_centred_rewards():
  expected = [1 - 4 / 3, 0 - 1, 0 - 4 / 3, 2 - 1, 0.0, 3 - 4 / 3]
  np.testing.assert_allclose(adv_lib.dr_grpo_advantages(REWARDS, GROUP_IDS, NUM_GROUPS),
                             expected, **TOL)


@pytest.mark.parametrize("fn", [adv_lib.grpo_advantages, adv_lib.dr_grpo_advantages,
                                adv_lib.rloo_advantages, adv_lib.batch_std_advantages])
def test_constant_groups_get_exactly_zero(fn):
  # 0.1 is not representable: a float mean of three copies can miss it by one rounding, which
  # a std division (eps 0) would blow up. Constant groups must give exactly 0, never nan.
  rewards = jnp.array([0.1, 0.7, 0.1, 0.7, 0.1, 0.7])
  group_ids = jnp.array([0, 1, 0, 1, 0, 1])
  kwargs = {} if fn in (adv_lib.dr_grpo_advantages, adv_lib.rloo_advantages) else {"eps": 0.0}
  np.testing.assert_array_equal(fn(rewards, group_ids, 2, **kwargs), np.zeros(6))


def test_rloo_advantages_leave_one_out():
  # Group 0: 1 - (0+3)/2, 0 - (1+3)/2, 3 - (1+0)/2; group 1: 0 - 2, 2 - 0; one-sample group: 0.
  expected = [-0.5, -2.0, -2.0, 2.0, 0.0, 2.5]
  np.testing.assert_allclose(adv_lib.rloo_advantages(REWARDS, GROUP_IDS, NUM_GROUPS),
                             expected, **TOL)


def test_batch_std_advantages():
  # Group-centred rewards c = [-1/3, -1, -4/3, 1, 0, 5/3] (sum 0), batch sample std
  # sqrt(sum c^2 / 5) = sqrt((1 + 9 + 16 + 9 + 0 + 25) / 9 / 5) = sqrt(4/3).
  centred = np.array([-1 / 3, -1, -4 / 3, 1, 0, 5 / 3])
  expected = centred / math.sqrt(4 / 3)
  got = adv_lib.batch_std_advantages(REWARDS, GROUP_IDS, NUM_GROUPS, eps=0.0)
  np.testing.assert_allclose(got, expected, **TOL)


def test_zero_variance_group_flags():
  rewards = jnp.array([1.0, 0.0, 1.0, 2.0, 2.0, 5.0, 0.3, 0.35])
  group_ids = jnp.array([0, 1, 0, 1, 2, 3, 4, 4])
  per_sample, per_group = adv_lib.zero_variance_groups(rewards, group_ids, 6)
  # Group 0 [1, 1]: equal; 1 [0, 2]: not; 2 [2] and 3 [5]: one sample, equal; 4: spread 0.05;
  # 5: empty -> False.
  np.testing.assert_array_equal(per_group, [True, False, True, True, False, False])
  np.testing.assert_array_equal(per_sample, [True, False, True, False, True, True, False, False])
  _, loose = adv_lib.zero_variance_groups(rewards, group_ids, 6, atol=0.1)
  np.testing.assert_array_equal(loose, [True, False, True, True, True, False])
  # The flagged samples are exactly those with zero GRPO advantage (and no nan).
  grpo = adv_lib.grpo_advantages(rewards, group_ids, 6)
  assert np.all(np.isfinite(grpo))
  np.testing.assert_array_equal(np.asarray(grpo) == 0.0, per_sample)


@pytest.mark.parametrize("length,expected", [
    (0, 0.0), (16, 0.0), (17, -0.25), (18, -0.5), (19, -0.75), (20, -1.0), (21, -1.0),
    (1000, -1.0)])
def test_overlong_penalty_at_boundaries(length, expected):
  # L_max = 20, L_cache = 4: zero up to 16 tokens, linear to -1 at 20, -1 beyond (exact).
  got = adv_lib.overlong_penalty(jnp.array([length]), max_length=20, cache_length=4)
  np.testing.assert_allclose(got, [expected], rtol=0, atol=1e-7)


def test_overlong_penalty_full_cache():
  # L_cache = L_max: the penalty starts at length 0 and reaches -1 at L_max.
  got = adv_lib.overlong_penalty(jnp.array([0, 5, 10, 11]), max_length=10, cache_length=10)
  np.testing.assert_allclose(got, [0.0, -0.5, -1.0, -1.0], rtol=0, atol=1e-7)


def test_functions_are_jittable():
  # Same results under jit with num_groups static (exact: identical ops).
  for fn in (adv_lib.grpo_advantages, adv_lib.dr_grpo_advantages, adv_lib.rloo_advantages,
             adv_lib.batch_std_advantages):
    jitted = jax.jit(functools.partial(fn, num_groups=NUM_GROUPS))
    np.testing.assert_allclose(jitted(REWARDS, GROUP_IDS), fn(REWARDS, GROUP_IDS, NUM_GROUPS),
                               rtol=1e-6, atol=1e-7, err_msg=fn.__name__)
  flags = jax.jit(functools.partial(adv_lib.zero_variance_groups, num_groups=NUM_GROUPS))
  np.testing.assert_array_equal(flags(REWARDS, GROUP_IDS)[1], [False, False, True, False])
  penalty = jax.jit(functools.partial(adv_lib.overlong_penalty, max_length=20, cache_length=4))
  np.testing.assert_allclose(penalty(jnp.array([18])), [-0.5], atol=1e-7)


@pytest.mark.parametrize("call,argument", [
    (lambda: adv_lib.grpo_advantages(REWARDS, GROUP_IDS.astype(jnp.float32), 4), "group_ids"),
    (lambda: adv_lib.grpo_advantages(REWARDS, GROUP_IDS[:5], 4), "group_ids"),
    (lambda: adv_lib.grpo_advantages(REWARDS[None], GROUP_IDS, 4), "rewards"),
    (lambda: adv_lib.grpo_advantages(REWARDS, GROUP_IDS, 0), "num_groups"),
    (lambda: adv_lib.grpo_advantages(REWARDS, GROUP_IDS, 4, eps=-1.0), "eps"),
    (lambda: adv_lib.grpo_advantages(REWARDS, GROUP_IDS, 4, ddof=-1), "ddof"),
    (lambda: adv_lib.batch_std_advantages(REWARDS, GROUP_IDS, 4, ddof=0.5), "ddof"),
    (lambda: adv_lib.zero_variance_groups(REWARDS, GROUP_IDS, 4, atol=-0.1), "atol"),
    (lambda: adv_lib.overlong_penalty(jnp.array([3]), 20, 0), "cache_length"),
    (lambda: adv_lib.overlong_penalty(jnp.array([3]), 20, 21), "cache_length"),
    (lambda: adv_lib.overlong_penalty(jnp.array([3]), 0, 0), "max_length"),
])
def test_invalid_arguments_raise_naming_the_argument(call, argument):
  with pytest.raises(ValueError, match=argument):
    call()
