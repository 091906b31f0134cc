"""What a training run needs that follows from its config alone: the model, tokenizer, task, mesh
and reward (`Context`), the data sources, the held-out set and the starting params.

Multi-process convention: every process runs the same host-side logic on the FULL batch (data
pipelines are deterministic from the seed, rewards are recomputed everywhere), while device arrays
are global and sharded over the mesh (m1jax.train.transfer). So one code path serves 1 device, a
mesh of fake CPU devices, one GPU, and many hosts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
from absl import logging

from m1jax import config as model_config
from m1jax import convert, model, sharding
from m1jax.data import pipeline, tasks
from m1jax.data.tokenizer import load_tokenizer
from m1jax.rl import rewards
from m1jax.train import schema


def init_distributed(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0):
  """jax.distributed for multi-process runs (no-op for one process). CPU uses gloo collectives."""
  if num_processes <= 1:
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def configure_compilation_cache(directory: str, max_gb: float) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory` (user-expanded; "" leaves it
  off), at most max_gb GiB (least recently used entries go first). A cache directory already
  set (JAX_COMPILATION_CACHE_DIR, jax.config) is left as it is. Returns the directory in use."""
  if jax.config.jax_compilation_cache_dir or not directory:
    return jax.config.jax_compilation_cache_dir
  directory = os.path.expanduser(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_compilation_cache_max_size", int(max_gb * 2**30))
  compilation_cache.reset_cache()  # a process that compiled before starts using it too
  return directory


@dataclasses.dataclass
class Context:
  """Everything a stage needs that follows from the config alone."""
  config: ml_collections.ConfigDict
  workdir: str
  model_cfg: model_config.ModelConfig
  tokenizer: Any
  task: Any  # m1jax.data.tasks.Task, or None for JSONL data
  mesh: jax.sharding.Mesh
  reward_fn: rewards.CombinedReward
  examples: list | None = None  # JSONL data (task.name=jsonl), read and length-checked

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def vocab_limit(self) -> int | None:
    """The tokenizer's size when the model's vocabulary is padded beyond it (ids at or above are
    never sampled nor scored), else None."""
    size = self.tokenizer.vocab_size
    return size if size < self.model_cfg.vocab_size else None

  @property
  def batch_devices(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp", "expert")]))


def build_context(config: ml_collections.ConfigDict, workdir: str,
                  read_data: bool = True) -> Context:
  """The Context of `config`. With `read_data`, JSONL data is read and the examples' lengths are
  checked against the run's limits (`check_lengths`); without, nothing but the model, tokenizer
  and mesh is needed (e.g. to read a finished run's params)."""
  tokenizer = load_tokenizer(config.tokenizer)
  model_cfg = schema.model_from_config(config.model)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.model: vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size}")
  if model_cfg.eos_token_id is None:
    model_cfg = model_cfg.replace(eos_token_id=tokenizer.eos_id)
  task, examples = None, None
  if config.task.name not in ("jsonl", "code_jsonl"):
    task = tasks.make_task(config.task.name, **config.task.kwargs)
  if read_data and task is not None:  # a sample of the synthetic stream
    sample = [tasks.generate_example(task, seed=config.seed, index=i,
                                     eval_fraction=config.task.eval_fraction) for i in range(64)]
    check_lengths(config, tokenizer, sample, f"task {config.task.name}", drop=False)
  elif read_data:
    jsonl_task = tasks.code_tasks.TASK if config.task.name == "code_jsonl" else "math"
    examples = check_lengths(
        config, tokenizer, tasks.read_jsonl(config.task.jsonl_path, task=jsonl_task),
        config.task.jsonl_path, drop=config.task.drop_long)
  mesh = sharding.make_mesh(dict(config.mesh))
  code_reward = rewards.code.CodeReward(rewards.code.CodeSettings.from_config(config.code))
  if config.task.name in schema.CODE_TASKS or config.reward.get("code", 0) > 0:
    code_reward.check()  # fails closed now, before any training, when the sandbox cannot start
  reward_fn = rewards.combine(dict(config.reward), {"code": code_reward})
  return Context(config=config, workdir=workdir, model_cfg=model_cfg, tokenizer=tokenizer,
                 task=task, mesh=mesh, reward_fn=reward_fn,
                 examples=examples)


def check_lengths(config: ml_collections.ConfigDict, tokenizer, examples: list, where: str,
                  drop: bool) -> list:
  """The examples within the run's length limits: BOS + prompt <= rl.max_prompt_len (RL
  prompts and every held-out evaluation) and, with an SFT stage, BOS + prompt + demonstration +
  EOS <= sft.max_len. Over-long examples are dropped (`drop`, logged) or raise ValueError naming
  the limits' keys, before anything is trained."""
  with_sft = config.mode in ("sft", "sft_rl")
  kept, over = [], []
  for index, example in enumerate(examples):
    prompt = len(pipeline.encode_prompt(tokenizer, example.prompt))
    full = len(pipeline.encode_sft(tokenizer, example)[0]) if with_sft else 0
    problems = ([f"prompt of {prompt} tokens > config.rl.max_prompt_len="
                 f"{config.rl.max_prompt_len}"] if prompt > config.rl.max_prompt_len else [])
    if full > config.sft.max_len:
      problems.append(f"prompt + demonstration of {full} tokens > config.sft.max_len="
                      f"{config.sft.max_len}")
    if problems:
      over.append(f"example {index + 1} ({example.prompt[:40]!r}): {', '.join(problems)}")
    else:
      kept.append(example)
  if over and drop:
    logging.warning("%s: dropped %d of %d examples over the length limits (config.task.drop_long"
                    "); the first: %s", where, len(over), len(examples), over[0])
  elif over:
    fix = ("raise those limits or set config.task.drop_long=True to drop such examples"
           if where != f"task {config.task.name}" else
           "raise those limits or make the task's examples shorter (config.task.kwargs)")
    raise ValueError(f"{where}: {len(over)} of {len(examples)} examples are longer than this "
                     f"run allows, e.g. {'; '.join(over[:3])}; {fix}")
  if not kept:
    raise ValueError(f"{where}: no example is within the length limits")
  return kept


def source(ctx: Context, split: str):
  """The grain MapDataset of examples for `split` ("train" / "eval")."""
  t = ctx.config.task
  if t.name in ("jsonl", "code_jsonl"):
    return pipeline.examples_source(ctx.examples, split=split, eval_fraction=t.eval_fraction,
                                    where=t.jsonl_path)
  return pipeline.synthetic_source(ctx.task, seed=ctx.config.seed, split=split,
                                   eval_fraction=t.eval_fraction)


def eval_examples(ctx: Context) -> list:
  t = ctx.config.task
  if t.name in ("jsonl", "code_jsonl"):
    return list(source(ctx, "eval"))[:t.eval_size]
  return tasks.make_eval_set(ctx.task, size=t.eval_size, seed=t.eval_seed,
                             eval_fraction=t.eval_fraction)


def initial_params(ctx: Context, shardings):
  """Params to start from: the HF checkpoint when config.model.hf_dir is set, else a random init."""
  if ctx.config.model.hf_dir:
    return convert.load_sharded(ctx.model_cfg, ctx.config.model.hf_dir, shardings)
  return model.init(ctx.model_cfg, jax.random.key(ctx.config.seed), shardings)
