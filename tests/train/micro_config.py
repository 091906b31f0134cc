r"""A training config small enough for tests: a 2-layer (lightning + softmax) model, 6 steps.

  python -m experiments.train --config=tests/train/micro_config.py --workdir=/tmp/micro
"""

from m1jax.train import schema


def get_config():
  c = schema.base_config()
  c.mode = "rl"
  c.model = schema.model_fields("tiny", vocab_size=264, hidden_size=32, intermediate_size=32,
                                  num_hidden_layers=2, attn_type_list=(0, 1), block_size=8)
  c.task.eval_size = 16
  c.reward.task = 1.0
  c.sft.steps = 6
  c.sft.batch_size = 8
  c.sft.max_len = 40
  c.sft.log_every = 1
  c.sft.optimizer.learning_rate = 1e-2
  c.rl.steps = 6
  c.rl.prompts_per_step = 4
  c.rl.samples_per_prompt = 4
  c.rl.updates_per_batch = 2
  c.rl.max_prompt_len = 16
  c.rl.max_new_tokens = 12
  c.rl.dynamic_sampling = False
  c.rl.eval_every = 3
  c.eval.batch_size = 16
  c.eval.max_new_tokens = 12
  c.checkpoint.every_steps = 100
  c.max_consecutive_nonfinite = 2
  c.progress = False
  return c
