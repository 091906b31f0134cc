r"""GSPO: sequence-level ratio (geometric mean) with its clip (3e-4 / 4e-4);
RL from the SFT warm start.

  python -m experiments.train --config=configs/sft/arithmetic.py --workdir=workdirs/sft_arithmetic
  python -m experiments.train --config=configs/rl/gspo_arithmetic.py --workdir=workdirs/gspo

Expected on 2 CPU cores: about 6 minutes for 60 steps with 16 minibatch updates per generation
batch (--config.rl.updates_per_batch=1 for on-policy updates).
"""

from configs import common


def get_config():
  return common.rl_ablation("gspo")
