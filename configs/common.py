"""Settings shared by the arithmetic configs (demo, SFT, RL ablations)."""

from m1jax.train import schema


def arithmetic(mode: str):
  """1-2 digit addition with worked answers, byte tokenizer, a 4-layer hybrid model for CPU.

  The model is the tiny preset widened to 128 with a 1:1 layout (softmax first): on the CPU
  budget the tiny preset's own layout (3 lightning layers, then 1 softmax layer, width 64) does
  not learn to copy the digits it needs (2.7% held-out accuracy after 200 SFT steps against 17%
  here; docs/training.md). The 7:1 layout is the `small` and `minimax-m1-456b` presets'.
  """
  c = schema.base_config()
  c.mode = mode
  c.model = schema.model_fields("tiny", vocab_size=264, hidden_size=128,
                                  attn_type_list=(1, 0, 1, 0))
  c.task.name = "arithmetic"
  c.task.kwargs.min_digits = 1
  c.task.kwargs.max_digits = 2
  c.sft.steps = 200
  c.sft.batch_size = 64
  c.sft.max_len = 48
  c.sft.optimizer.learning_rate = 3e-3
  c.sft.optimizer.warmup_steps = 10
  c.sft.eval_every = 100
  c.rl.prompts_per_step = 16
  c.rl.samples_per_prompt = 8
  c.rl.max_prompt_len = 16
  c.rl.max_new_tokens = 32
  c.rl.optimizer.learning_rate = 1e-4
  c.rl.eval_every = 10
  c.eval.max_new_tokens = 32
  c.checkpoint.every_steps = 25
  return c


def rl_ablation(kind: str, **loss_changes):
  """RL from the SFT checkpoint of configs/sft/arithmetic.py with one objective."""
  c = arithmetic("rl")
  c.rl.init_from = "workdirs/sft_arithmetic/sft"
  c.rl.steps = 60
  c.rl.updates_per_batch = 16  # the paper's off-policy regime (16 minibatches per generation batch)
  c.rl.loss.kind = kind
  for key, value in loss_changes.items():
    c.rl.loss[key] = value
  return c
