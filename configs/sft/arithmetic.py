r"""SFT on worked 1-2 digit additions: the warm start of the RL ablations in configs/rl/.

  python -m experiments.train --config=configs/sft/arithmetic.py --workdir=workdirs/sft_arithmetic

Expected on 2 CPU cores: about 3 minutes; held-out accuracy ~0.2.
"""

from configs import common


def get_config():
  return common.arithmetic("sft")
