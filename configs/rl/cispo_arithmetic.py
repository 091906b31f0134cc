r"""CISPO: clipped IS weights, every token keeps its gradient (absolute cap 5);
RL from the SFT warm start.

  python -m experiments.train --config=configs/sft/arithmetic.py --workdir=workdirs/sft_arithmetic
  python -m experiments.train --config=configs/rl/cispo_arithmetic.py --workdir=workdirs/cispo

Expected on 2 CPU cores: about 6 minutes for 60 steps with 16 minibatch updates per generation
batch (--config.rl.updates_per_batch=1 for on-policy updates).
"""

from configs import common


def get_config():
  return common.rl_ablation("cispo", is_ratio_cap=5.0)
