"""The train/inference mismatch options of the RL loop on the micro config: recomputed old
log-probs, rollout correction, routing replay and rollout lag, alone and together; what the
sampler and the trainer receive under each; the config checks."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl import rewards
from m1jax.train import driver, rl as rl_trainer, schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECOMPUTE = {"rl.old_logprobs": "recompute"}
TOKEN_TIS = {"rl.loss.rollout_correction": "token_tis"}
REPLAY = {"rl.routing_replay": True}
LAG = {"rl.rollout_lag": 2}
ALL = {**RECOMPUTE, **TOKEN_TIS, **REPLAY, **LAG}


def _set(config, changes):
  for path, value in changes.items():
    node = config
    *parents, leaf = path.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _micro(**changes):
  """tests/train/micro_config.py with a dense reward (the share of digits in the response),
  so a random model gets a learning signal."""
  dense = {"reward.task": 0.0, "reward.mismatch_digit_share": 1.0, "rl.steps": 3}
  return schema.load_config(os.path.join(ROOT, "tests/train/micro_config.py"),
                            {**dense, **changes})


def _digit_share(text, example):
  del example
  return sum(c.isdigit() for c in text) / max(len(text), 1)


rewards.register_reward("mismatch_digit_share", _digit_share)


def _records(workdir):
  """metrics.jsonl without the wall-clock entries (time_s and the time/* phase timings)."""
  with open(os.path.join(workdir, "rl", "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items()
             if k != "time_s" and not k.startswith("time/")} for line in f]


@pytest.mark.parametrize("changes", [RECOMPUTE, TOKEN_TIS, REPLAY, LAG, ALL],
                         ids=["recompute", "token_tis", "routing_replay", "lag2", "all"])
def test_mismatch_options_run_alone_and_together(changes, tmp_path):
  # The demo accepts each option and all four (checked here on the demo config itself), and the
  # micro config trains with them: 3 steps, finite metrics, non-zero gradients.
  demo = schema.load_config(os.path.join(ROOT, "configs/demo.py"), changes)
  schema.validate(demo)
  config = _micro(**changes)
  schema.validate(config)
  summary = driver.run_from_config(config, str(tmp_path))
  assert summary["rl"]["last_step"] == 3
  steps = [r for r in _records(tmp_path) if "grad_norm" in r]
  assert [r["step"] for r in steps] == [1, 2, 3]
  assert all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
  assert any(r["grad_norm"] > 0 for r in steps)
  recompute = (changes.get("rl.old_logprobs") == "recompute"
               or "rl.loss.rollout_correction" in changes)
  if not recompute:
    assert not any(k.startswith("rollout_") for r in steps for k in r)
    return
  for r in steps:
    assert 0 < r["rollout_ess_token"] <= 1 + 1e-6 and 0 < r["rollout_ess_seq"] <= 1 + 1e-6
    assert 0 < r["rollout_weight_min"] <= r["rollout_weight_mean"] <= r["rollout_weight_max"]
  if "rl.rollout_lag" not in changes:
    # Same params, float32 on CPU: the trainer's forward reproduces the sampler's log-probs to
    # rounding (the two paths sum in different orders): |log pi_old - log pi_rollout| < 1e-4.
    assert all(r["rollout_abs_log_diff_max"] < 1e-4 for r in steps)
    assert all(r["rollout_prob_pearson"] > 1 - 1e-6 for r in steps)
  else:
    # Lag 2: steps 1 and 2 sample with the initial params, which the trainer has left by step 2.
    assert steps[0]["rollout_abs_log_diff_max"] < 1e-4
    assert all(r["rollout_abs_log_diff_max"] > 1e-3 for r in steps[1:])


def _fingerprint(params):
  """A host copy of one leaf: identifies a parameter version (buffers are donated later)."""
  return np.asarray(params["lm_head"]).copy()


def _run_with_spies(config, workdir, monkeypatch):
  """Runs `config`; returns per step (trainer params at the step's start, params handed to the
  sampler, whether they are the same object) and the params the sampler generated with."""
  seen, sampled = [], []
  original = rl_trainer.ParamsHistory.sampler_params
  original_call = rl_trainer.Sampler.__call__

  def spy(self, params):
    out = original(self, params)
    seen.append((_fingerprint(params), _fingerprint(out), out is params))
    return out

  def sampler_spy(self, params, batch, key, *rest):
    sampled.append(_fingerprint(params))
    return original_call(self, params, batch, key, *rest)

  with monkeypatch.context() as m:
    m.setattr(rl_trainer.ParamsHistory, "sampler_params", spy)
    m.setattr(rl_trainer.Sampler, "__call__", sampler_spy)
    driver.run_from_config(config, str(workdir))
  return seen, sampled


def _check_lag(lag, seen, sampled):
  # At step s the sampler generates with the trainer's params from the start of step s - lag
  # (the first params before that); lag 0 passes the trainer's own params, uncopied.
  assert len(seen) == 3 and len(sampled) == 3  # no dynamic sampling: one batch per step
  trainer = [s[0] for s in seen]
  assert not np.array_equal(trainer[0], trainer[1])  # the trainer moves every step
  for step, (_, given, same_object) in enumerate(seen):
    np.testing.assert_array_equal(given, trainer[max(step - lag, 0)])
    np.testing.assert_array_equal(sampled[step], given)
    assert same_object == (lag == 0 or step == 0)


def test_lag_one_samples_with_the_previous_steps_params(tmp_path, monkeypatch):
  _check_lag(1, *_run_with_spies(_micro(**{"rl.rollout_lag": 1}), tmp_path, monkeypatch))


def test_params_history_keeps_lag_copies():
  history = rl_trainer.ParamsHistory(2)
  versions = [{"w": jnp.full((2,), float(i))} for i in range(5)]
  got = [float(history.sampler_params(v)["w"][0]) for v in versions]
  assert got == [0.0, 0.0, 0.0, 1.0, 2.0]
  assert len(history._kept) == 2  # pylint: disable=protected-access
  zero = rl_trainer.ParamsHistory(0)
  assert all(zero.sampler_params(v) is v for v in versions)


def test_lag_zero_is_the_loop_without_lag(tmp_path, monkeypatch):
  # rollout_lag=0 hands the sampler the trainer's own params every step, and writes exactly the
  # metrics of the loop with the lag machinery removed.
  _check_lag(0, *_run_with_spies(_micro(), tmp_path / "lag0", monkeypatch))

  class NoHistory:
    def __init__(self, lag, shardings=None):
      del lag, shardings

    def sampler_params(self, params):
      return params

  monkeypatch.setattr(rl_trainer, "ParamsHistory", NoHistory)
  driver.run_from_config(_micro(), str(tmp_path / "without"))
  assert _records(tmp_path / "lag0") == _records(tmp_path / "without")


def test_replay_inputs_cover_the_fed_response_tokens():
  # Rows of 2 prompt and 3 response columns, lengths 3 and 1: the sampler fed tokens 0, 1 of
  # the first row and none of the second; the prompt and the last token route as usual.
  experts = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).astype(np.uint8)
  rollouts = rl_trainer.Rollouts(
      tokens=np.ones((2, 2), np.int32), prompt_mask=np.ones((2, 2), bool),
      completions=np.ones((2, 3), np.int32), logprobs=np.zeros((2, 3), np.float32),
      lengths=np.array([3, 1]), finish_reasons=np.zeros(2, np.int32),
      rewards=np.zeros(2, np.float32), correct=np.zeros(2, np.float32), experts=experts)
  got_experts, mask = rl_trainer.replay_inputs(rollouts, 3)
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(got_experts[:, 2:], experts)
  assert got_experts.dtype == np.uint8 and not got_experts[:, :2].any()


@pytest.mark.parametrize("changes, message", [
    ({"rl.old_logprobs": "trainer"}, "rl.old_logprobs"),
    ({"rl.rollout_lag": -1}, "rl.rollout_lag"),
    ({"rl.routing_replay": 1}, "routing_replay"),
    ({"rl.loss.rollout_correction": "tis"}, "rollout_correction"),
    ({"rl.loss.rollout_cap": 0.5}, "rollout_cap"),
    ({"rl.loss.rollout_mask_high": 0.9}, "rollout_mask_high"),
])
def test_bad_mismatch_options_name_the_key(changes, message):
  config = _micro()
  with pytest.raises((ValueError, TypeError), match=message):
    _set(config, changes)
    schema.validate(config)
