"""Advantage estimators and reward shaping for group-sampled RL (GRPO family), in pure jnp.

Responses are grouped by prompt: `group_ids` int [B] gives each response's group, an id in
[0, num_groups); groups may have unequal sizes and need not be contiguous. `num_groups` is a
static Python int (an upper bound is fine: unused ids are empty groups). Group statistics use
segment sums, so every function is jit-able with `num_groups` static. Outputs are float32 [B]
unless stated; broadcast them over tokens (or pass [B] straight to `losses.policy_loss`).

Standard deviations divide the squared deviations by max(n - ddof, 1); ddof=1 (sample std) is
the default, as in the common GRPO implementations. Groups whose rewards are all equal (and
groups of one response) get advantage exactly 0 from every estimator.
"""

import jax
import jax.numpy as jnp


def _checked_groups(rewards, group_ids, num_groups):
  """Validates the group arguments; returns (rewards float32 [B], group_ids [B])."""
  rewards, group_ids = jnp.asarray(rewards), jnp.asarray(group_ids)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be [B], got shape {rewards.shape}.")
  if group_ids.shape != rewards.shape:
    raise ValueError(f"group_ids must have the shape of rewards {rewards.shape}, "
                     f"got {group_ids.shape}.")
  if not jnp.issubdtype(group_ids.dtype, jnp.integer):
    raise ValueError(f"group_ids must be integers, got dtype {group_ids.dtype}.")
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive Python int, got {num_groups!r}.")
  return rewards.astype(jnp.float32), group_ids


def _check_eps(eps):
  if not eps >= 0:
    raise ValueError(f"eps must be >= 0, got {eps!r}.")


def _check_ddof(ddof):
  if not isinstance(ddof, int) or ddof < 0:
    raise ValueError(f"ddof must be a non-negative int, got {ddof!r}.")


def _group_sum(values, group_ids, num_groups):
  """[B] -> [G]."""
  return jax.ops.segment_sum(values, group_ids, num_segments=num_groups)


def _group_range(rewards, group_ids, num_groups):
  """Per-group (max, min) [G]; an empty group has max -inf and min +inf."""
  return (jax.ops.segment_max(rewards, group_ids, num_segments=num_groups),
          jax.ops.segment_min(rewards, group_ids, num_segments=num_groups))


def group_mean_and_std(rewards, group_ids, num_groups: int, ddof: int = 1):
  """Mean and std of each response's group, gathered back per response.

  A group whose rewards are all equal gets exactly that reward as mean and 0 as std, so its
  centred rewards are exactly 0 (a float mean of equal values can be off by one rounding).

  Args:
    rewards: [B] float.
    group_ids: [B] int in [0, num_groups).
    num_groups: static number of group ids.
    ddof: the std divides the squared deviations by (n - ddof), at least 1.

  Returns:
    (mean [B], std [B]) float32.
  """
  rewards, group_ids = _checked_groups(rewards, group_ids, num_groups)
  _check_ddof(ddof)
  counts = _group_sum(jnp.ones_like(rewards), group_ids, num_groups)
  group_max, group_min = _group_range(rewards, group_ids, num_groups)
  constant = group_max == group_min
  means = _group_sum(rewards, group_ids, num_groups) / jnp.maximum(counts, 1.0)
  means = jnp.where(constant, group_max, means)
  deviations = rewards - means[group_ids]
  squares = _group_sum(deviations**2, group_ids, num_groups)
  stds = jnp.where(constant, 0.0, jnp.sqrt(squares / jnp.maximum(counts - ddof, 1.0)))
  return means[group_ids], stds[group_ids]


def _scale(centred, std, eps):
  """centred / (std + eps), and 0 where std is 0 (then centred is 0 too)."""
  return jnp.where(std > 0, centred / jnp.where(std > 0, std + eps, 1.0), 0.0)


def grpo_advantages(rewards, group_ids, num_groups: int, *, eps: float = 1e-6, ddof: int = 1):
  """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps). [B] -> [B]; 0 in zero-variance groups."""
  _check_eps(eps)
  mean, std = group_mean_and_std(rewards, group_ids, num_groups, ddof)
  return _scale(jnp.asarray(rewards, jnp.float32) - mean, std, eps)


def dr_grpo_advantages(rewards, group_ids, num_groups: int):
  """Dr.GRPO: A_i = R_i - mean_g R, without the std division. [B] -> [B]."""
  mean, _ = group_mean_and_std(rewards, group_ids, num_groups)
  return jnp.asarray(rewards, jnp.float32) - mean


def batch_std_advantages(rewards, group_ids, num_groups: int, *, eps: float = 1e-6,
                         ddof: int = 1):
  """Group mean, batch std (ScaleRL's batch-level normalisation). [B] -> [B].

  A_i = (R_i - mean_g R) / (std_batch(R - mean_g R) + eps): the group-centred rewards are
  divided by their standard deviation over the whole batch, so groups with a small reward
  spread are not scaled up as they are by the per-group std. All zero if every group is
  constant.
  """
  _check_eps(eps)
  _check_ddof(ddof)
  centred = dr_grpo_advantages(rewards, group_ids, num_groups)
  deviations = centred - jnp.mean(centred)
  batch_std = jnp.sqrt(jnp.sum(deviations**2) / max(centred.shape[0] - ddof, 1))
  return _scale(centred, batch_std, eps)


def rloo_advantages(rewards, group_ids, num_groups: int):
  """RLOO: A_i = R_i - mean of the other responses of the group. [B] -> [B].

  Computed as the equal n/(n-1) (R_i - mean_g R) for a group of n; 0 for a group of one.
  """
  rewards, group_ids = _checked_groups(rewards, group_ids, num_groups)
  counts = _group_sum(jnp.ones_like(rewards), group_ids, num_groups)[group_ids]
  centred = dr_grpo_advantages(rewards, group_ids, num_groups)
  return centred * counts / jnp.maximum(counts - 1.0, 1.0)


def zero_variance_groups(rewards, group_ids, num_groups: int, *, atol: float = 0.0):
  """Groups whose rewards are all equal (max - min <= atol): DAPO's dynamic-sampling filter.

  Such groups have zero group-relative advantage and give no policy gradient.

  Args:
    rewards: [B] float.
    group_ids: [B] int in [0, num_groups).
    num_groups: static number of group ids.
    atol: largest reward spread still counted as zero variance.

  Returns:
    (per_sample [B] bool, per_group [G] bool). per_group is False for an empty group.
  """
  rewards, group_ids = _checked_groups(rewards, group_ids, num_groups)
  if not atol >= 0:
    raise ValueError(f"atol must be >= 0, got {atol!r}.")
  group_max, group_min = _group_range(rewards, group_ids, num_groups)
  counts = _group_sum(jnp.ones_like(rewards), group_ids, num_groups)
  per_group = (counts > 0) & (group_max - group_min <= atol)
  return per_group[group_ids], per_group


def overlong_penalty(lengths, max_length: int, cache_length: int):
  """DAPO's soft overlong punishment, added to the reward. [B] int -> [B] float32 in [-1, 0].

  With L_max = max_length and L_cache = cache_length:
    0                                   if |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
    -1                                  if |y| > L_max

  Args:
    lengths: [B] response lengths |y| in tokens.
    max_length: static L_max > 0.
    cache_length: static L_cache, 0 < L_cache <= L_max.
  """
  if not max_length > 0:
    raise ValueError(f"max_length must be > 0, got {max_length!r}.")
  if not 0 < cache_length <= max_length:
    raise ValueError(f"cache_length must be in (0, max_length={max_length}], "
                     f"got {cache_length!r}.")
  lengths = jnp.asarray(lengths).astype(jnp.float32)
  soft_start = max_length - cache_length
  penalty = (soft_start - lengths) / cache_length
  return jnp.clip(penalty, -1.0, 0.0)
