r"""The README's main job: SFT warm start, then CISPO RL, on 1-2 digit addition, on CPU.

  python -m experiments.train --config=configs/demo.py --workdir=workdirs/demo

Expected on 2 CPU cores: about 6 minutes after installation; the held-out accuracy (greedy, 256
prompts never trained on) goes from ~0.2 after SFT to ~0.45 after 50 RL steps. Compare
objectives on the same start with --config.rl.loss.kind=grpo (or dapo, gspo).
"""

from configs import common


def get_config():
  c = common.arithmetic("sft_rl")
  c.rl.steps = 50
  c.rl.updates_per_batch = 2
  c.rl.loss.kind = "cispo"
  return c
