r"""Staged length-window expansion at demo scale: SFT, then CISPO RL in two stages.

  python -m experiments.train --config=configs/rl/staged_demo.py --workdir=workdirs/staged_demo

Stage 0 samples at most 16 tokens, too few for most worked answers ("67+34=" ->
"7+4=11,6+3+1=10 #### 101": 24 tokens with EOS), and moves on once more than half of its responses
over its last 3 steps were cut at the window (M1 moves on when the output lengths reach the
window), at the latest after 12 steps. Stage 1 doubles the window to 32 and, as M1 did when the
window grew, lowers the IS-weight cap, the gradient clipping norm and the learning rate. The
boundary shows in metrics.jsonl (`stage`, `stage_step`, `max_new_tokens`, `learning_rate`,
`grad_clip`), in the printed line "rl step N: stage 0 ends ..." and in rl/metrics.png.
A few minutes on 2 CPU cores (200 SFT steps, 20 RL steps).
"""

from configs import common
from m1jax.train import schema


def get_config():
  c = common.arithmetic("sft_rl")
  c.rl.steps = 20
  c.rl.updates_per_batch = 2
  c.rl.eval_every = 10
  c.rl.stages = (
      schema.rl_stage(max_new_tokens=16, steps=12,
                      advance_when=dict(metric="truncated_length", above=0.5, window=3,
                                        min_steps=4)),
      schema.rl_stage(max_new_tokens=32, loss=dict(is_ratio_cap=3.0),
                      optimizer=dict(learning_rate=5e-5, grad_clip=0.5)),
  )
  return c
