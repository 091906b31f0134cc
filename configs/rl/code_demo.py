r"""SFT then CISPO RL on one-line programming problems, rewarded by running the code in a sandbox.

  python -m experiments.train --config=configs/rl/code_demo.py --workdir=workdirs/code_demo

Demo scale, on CPU: the 4-layer byte-level model of configs/common.py learns to write `def f(...)`
functions from short descriptions ("f(x): x times 3 plus 2"); each sampled response runs in
bubblewrap against the problem's 5 hidden tests (m1jax.rl.rewards.code; docs/code_reward.md),
2 programs at a time. Needs bubblewrap (`make sandbox`); without it the run stops at start
(config.code.unsafe_no_sandbox=True runs the code unisolated). A smoke run of a few steps:
--config.sft.steps=20 --config.rl.steps=3.
"""

from configs import common


def get_config():
  c = common.arithmetic("sft_rl")
  c.task.name = "code"
  c.task.kwargs = {"num_tests": 5}
  c.task.eval_size = 10  # the held-out split holds 12 distinct descriptions
  c.sft.steps = 300
  c.sft.max_len = 96
  c.sft.eval_every = 100
  c.rl.steps = 30
  c.rl.prompts_per_step = 8
  c.rl.samples_per_prompt = 8
  c.rl.updates_per_batch = 2
  c.rl.max_prompt_len = 40
  c.rl.max_new_tokens = 56
  c.rl.loss.kind = "cispo"
  c.eval.max_new_tokens = 56
  c.code.time_limit_s = 1.0
  c.code.workers = 2
  return c
