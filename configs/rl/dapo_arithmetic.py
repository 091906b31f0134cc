r"""DAPO: clip-higher (eps 0.2 / 0.28), token-level mean; RL from the SFT warm start.

  python -m experiments.train --config=configs/sft/arithmetic.py --workdir=workdirs/sft_arithmetic
  python -m experiments.train --config=configs/rl/dapo_arithmetic.py --workdir=workdirs/dapo

Expected on 2 CPU cores: about 6 minutes for 60 steps with 16 minibatch updates per generation
batch (--config.rl.updates_per_batch=1 for on-policy updates).
"""

from configs import common


def get_config():
  return common.rl_ablation("dapo")
