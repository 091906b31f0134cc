r"""Fig. 2 at a signal-dominated scale on one GPU: the base config of every run of the grid
(experiments/figures/fig2_grid.py), the small preset (0.75B, 7:1 layout, bf16) on 1-4 digit
addition, 128 prompts x 8 samples per step (1024 rows), 16 minibatches of 64 rows per generation
batch (16 off-policy updates), temperature 1.

  python -m experiments.figures.fig2_grid --config=configs/rl/fig2_grid_gpu.py \
      --out_dir=results/fig2_grid --max_minutes=9
  # One SFT + CISPO run of this config on its own:
  python -m experiments.train --config=configs/rl/fig2_grid_gpu.py --workdir=workdirs/fig2_grid

Each call trains what it can in --max_minutes and stops cleanly; the next call resumes (the
shared SFT start first, then the cells). The SFT stage is kept short (100 steps) so that the
start leaves room to learn: the longer SFT of configs/rl/fig2_small_gpu.py (600 steps) reaches
0.96-0.98 held-out accuracy and leaves the objectives nothing to separate. Calibrated on one
H200 (2026-12-02; the learning rate is constant after its 50 warm-up steps, so a shorter run is
the start of a longer one): held-out accuracy 0.35 at step 90, 0.62 at 100, 0.84 at 120, 0.95 at
150 (282 s with an evaluation every 10 steps). The grid prints the start's accuracy; aim for
0.3-0.7.
"""

from configs.rl import fig2_small_gpu


def get_config():
  c = fig2_small_gpu.get_config()
  c.sft.steps = 100
  c.rl.prompts_per_step = 128
  c.rl.samples_per_prompt = 8
  c.rl.updates_per_batch = 16  # minibatches of 1024 / 16 = 64 rows
  c.rl.temperature = 1.0
  c.rl.steps = 100
  c.rl.eval_every = 10
  c.checkpoint.every_steps = 10  # a call cut by its time limit loses at most 10 steps
  return c
