r"""The micro config in three RL stages (a count-based end, a rule-based end, the rest), with a
dense reward (the share of digits in the response) so a random model learns something.

  python -m experiments.train --config=tests/train/staged_config.py --workdir=/tmp/staged
"""

import importlib.util
import os

from m1jax.rl import rewards
from m1jax.train import schema


def digit_share(text, example):
  del example
  return sum(ch.isdigit() for ch in text) / max(len(text), 1)


try:
  rewards.get_reward_fn("staged_digit_share")
except ValueError:
  rewards.register_reward("staged_digit_share", digit_share)


def get_config():
  spec = importlib.util.spec_from_file_location(
      "micro_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro_config.py"))
  micro = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(micro)
  c = micro.get_config()
  c.reward.task = 0.0
  c.reward.staged_digit_share = 1.0
  c.rl.steps = 6
  c.checkpoint.every_steps = 3
  c.rl.stages = (
      schema.rl_stage(max_new_tokens=8, steps=2, optimizer=dict(learning_rate=2e-3)),
      # A random model rarely ends before the window: the rule fires after its first 2 steps.
      schema.rl_stage(max_new_tokens=10, steps=3, loss=dict(is_ratio_cap=2.0),
                      advance_when=dict(metric="truncated_length", above=0.5, window=2)),
      schema.rl_stage(max_new_tokens=12, optimizer=dict(learning_rate=5e-4, grad_clip=0.25)),
  )
  return c
