r"""A larger Fig. 2 run for one GPU: the small preset (0.75B, 7:1 layout, bf16) on 1-4 digit
addition, 64 prompts x 16 samples per step.

  python -m experiments.figures.fig2_objectives --config=configs/rl/fig2_small_gpu.py \
      --out_dir=results/fig2_gpu --rl_steps=200 --eval_every=20 --workers=1
  python -m experiments.train --config=configs/rl/fig2_small_gpu.py --workdir=workdirs/fig2_gpu

The second command trains one SFT + CISPO run. The model's 32768 ids exceed the byte
tokenizer's 264: the sampler and the trainer mask the rest (SamplingConfig.vocab_limit).
On one H200 (2026-12-02) the SFT stage takes 349 s for 600 steps and reaches 0.96-0.98
held-out accuracy; an RL step then takes 4.2 s (generate 2.6, update 1.3), and the reward is at
the ceiling from step 2 on (1.000 held-out from step 10): too little left to learn for the
objectives to differ. docs/benchmarks.md has the run.
"""

from configs import common
from m1jax.train import schema


def get_config():
  c = common.arithmetic("sft_rl")
  c.model = schema.model_fields("small", dtype="bfloat16")
  c.task.kwargs.max_digits = 4
  c.sft.steps = 600
  c.sft.batch_size = 128
  # The longest 1-4 digit example is 56 byte tokens (BOS + prompt + worked answer + EOS; its
  # prompt 11): the limits below hold every example.
  c.sft.max_len = 64
  c.sft.optimizer.learning_rate = 3e-4
  c.sft.optimizer.warmup_steps = 50
  c.rl.prompts_per_step = 64
  c.rl.samples_per_prompt = 16
  c.rl.max_new_tokens = 64
  c.rl.max_prompt_len = 24
  # 1024 sequences of up to 88 tokens in one update ask for 149 GiB on an H200: 8 minibatches
  # of 128 sequences, 8 optimizer steps per generation batch (the off-policy updates CISPO's
  # clipped weights are for).
  c.rl.updates_per_batch = 8
  c.rl.optimizer.learning_rate = 1e-5
  c.rl.steps = 200
  c.eval.max_new_tokens = 64
  c.eval.batch_size = 256
  return c
