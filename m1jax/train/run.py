"""What the SFT and RL stages share: set-up from a config, host <-> device data movement for any
number of processes, and a `Stage` that owns checkpoints, metrics, progress and failure handling.

Multi-process convention: every process runs the same host-side logic on the FULL batch (data
pipelines are deterministic from the seed, rewards are recomputed everywhere), while device arrays
are global and sharded over the mesh. So one code path serves 1 device, a mesh of fake CPU devices,
one GPU, and many hosts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from m1jax import config as model_config
from m1jax import convert, model, sharding
from m1jax.data import pipeline, tasks
from m1jax.data.tokenizer import load_tokenizer
from m1jax.rl import rewards
from m1jax.train import checkpoint as checkpoint_lib
from m1jax.train import defaults
from m1jax.train import metrics as metrics_lib
from m1jax.train import optimizer as optimizer_lib
from m1jax.train import state as state_lib


def init_distributed(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0):
  """jax.distributed for multi-process runs (no-op for one process). CPU uses gloo collectives."""
  if num_processes <= 1:
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


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

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def batch_devices(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp", "expert")]))


def build_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  tokenizer = load_tokenizer(config.tokenizer)
  model_cfg = defaults.model_from_config(config.model)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.model: vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size}")
  if model_cfg.eos_token_id is None:
    model_cfg = model_cfg.replace(eos_token_id=tokenizer.eos_id)
  task = None
  if config.task.name != "jsonl":
    task = tasks.make_task(config.task.name, **config.task.kwargs)
  mesh = sharding.make_mesh(dict(config.mesh))
  return Context(config=config, workdir=workdir, model_cfg=model_cfg, tokenizer=tokenizer,
                 task=task, mesh=mesh, reward_fn=rewards.combine(dict(config.reward)))


def source(ctx: Context, split: str):
  """The grain MapDataset of examples for `split` ("train" / "eval")."""
  t = ctx.config.task
  if t.name == "jsonl":
    return pipeline.jsonl_source(t.jsonl_path, split=split, eval_fraction=t.eval_fraction)
  return pipeline.synthetic_source(ctx.task, seed=ctx.config.seed, split=split,
                                   eval_fraction=t.eval_fraction)


def eval_examples(ctx: Context) -> list:
  t = ctx.config.task
  if t.name == "jsonl":
    return list(source(ctx, "eval"))[:t.eval_size]
  return tasks.make_eval_set(ctx.task, size=t.eval_size, seed=t.eval_seed,
                             eval_fraction=t.eval_fraction)


def initial_params(ctx: Context, shardings):
  """Params to start from: the HF checkpoint when config.model.hf_dir is set, else a random init."""
  if ctx.config.model.hf_dir:
    params = convert.hf.load_params(ctx.model_cfg, ctx.config.model.hf_dir)
    return jax.tree.map(jax.device_put, params, shardings)
  return model.init(ctx.model_cfg, jax.random.key(ctx.config.seed), shardings)


def to_global(array: np.ndarray, mesh) -> jax.Array:
  """A host array (identical on every process) as a global device array, batch dim sharded."""
  array = np.asarray(array)
  target = sharding.batch_sharding(mesh, array.ndim)
  return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def score(ctx: Context, tokens: np.ndarray, examples, lengths: np.ndarray):
  """Decodes responses once -> (combined reward [B] float32, task reward (correctness) [B])."""
  scores = rewards.score_responses(ctx.reward_fn, ctx.tokenizer, tokens, examples, lengths=lengths)
  task_reward = rewards.get_reward_fn("task")
  correct = np.asarray([task_reward(text, example)
                        for text, example in zip(scores.texts, examples)], np.float32)
  return scores.rewards, correct


def to_host(array: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array on every process."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class NonFiniteError(RuntimeError):
  pass


class Stage:
  """One training stage (sft or rl) in `workdir/<name>`: resume, checkpoints, metrics, progress."""

  def __init__(self, ctx: Context, name: str, total_steps: int,
               optimizer: optax.GradientTransformation, stage_cfg: ml_collections.ConfigDict,
               directory: str | None = None):
    self.ctx, self.name, self.total_steps, self.optimizer = ctx, name, total_steps, optimizer
    self.dir = directory or os.path.join(ctx.workdir, name)
    self.shardings = state_lib.state_shardings(ctx.model_cfg, optimizer, ctx.mesh)
    self.checkpointer = checkpoint_lib.Checkpointer(os.path.join(self.dir, "checkpoints"),
                                                    ctx.config.checkpoint.every_steps,
                                                    ctx.config.checkpoint.keep)
    self.log_every = stage_cfg.log_every
    self.start_step = 0
    self.writer = None
    self.progress = None
    self.records: list[dict[str, Any]] = []
    self._t0 = time.time()

  # --- state -------------------------------------------------------------------------------------
  def finished(self) -> bool:
    return self.checkpointer.latest_step() == self.total_steps

  def restore_or_create(self, make_params: Callable[[], Any]):
    """-> (state, data_state or None). Resumes the latest checkpoint when there is one."""
    latest = self.checkpointer.latest_step()
    if latest is not None:
      target = state_lib.abstract_state(self.ctx.model_cfg, self.optimizer, self.shardings)
      state, data_state, meta = self.checkpointer.restore(latest, target)
      if meta.get("seed") != self.ctx.config.seed:
        raise ValueError(f"{self.dir}: checkpoint was written with seed {meta.get('seed')}, "
                         f"config.seed={self.ctx.config.seed}; use another --workdir")
      self.start_step = latest
      logging.info("%s: resuming from step %d", self.name, latest)
      return state, data_state
    create = jax.jit(lambda p: state_lib.create(p, self.optimizer), out_shardings=self.shardings)
    return create(make_params()), None

  def final_params(self):
    """The params of this stage's last checkpoint (for the next stage)."""
    target = state_lib.abstract_state(self.ctx.model_cfg, self.optimizer, self.shardings)
    state, _, _ = self.checkpointer.restore(self.checkpointer.latest_step(), target)
    return state.params

  def save(self, step: int, state, data_state: Mapping[str, Any], force: bool = False) -> None:
    meta = {"seed": self.ctx.config.seed, "stage": self.name, "step": int(step),
            "config": json.loads(self.ctx.config.to_json_best_effort())}
    self.checkpointer.save(step, state, dict(data_state), meta, force=force)

  def save_if_consistent(self, state, step: int, data_state, updates_per_step: int = 1) -> None:
    """On interruption: checkpoint `state` if it is exactly `step` steps in (not mid-step)."""
    try:
      applied = int(jax.device_get(state.step))
    except RuntimeError:  # buffers donated to a step that did not finish
      applied = -1
    if applied == step * updates_per_step:
      self.save(step, state, data_state, force=True)
      self.checkpointer.wait()
      logging.warning("%s: interrupted; checkpoint at step %d in %s", self.name, step,
                      self.checkpointer.directory)
    else:
      logging.warning("%s: interrupted inside a step; the last periodic checkpoint (step %s) "
                      "stands", self.name, self.checkpointer.latest_step())

  # --- logging -----------------------------------------------------------------------------------
  def open(self):
    import tqdm  # pylint: disable=g-import-not-at-top
    os.makedirs(self.dir, exist_ok=True)
    self.writer = metrics_lib.MetricsWriter(self.dir, resume_step=self.start_step,
                                            tensorboard=self.ctx.config.tensorboard,
                                            enabled=self.ctx.is_main)
    self.records = [r for r in metrics_lib.read_jsonl(self.writer.path)] if self.ctx.is_main else []
    self.progress = tqdm.tqdm(total=self.total_steps, initial=self.start_step, desc=self.name,
                              unit="step", dynamic_ncols=True,
                              disable=not (self.ctx.config.progress and self.ctx.is_main))

  def log(self, step: int, metrics: Mapping[str, Any], postfix: Mapping[str, float] = ()) -> None:
    record = {k: float(v) if np.ndim(v) == 0 and not isinstance(v, str) else v
              for k, v in metrics.items()}
    record["time_s"] = time.time() - self._t0
    has_eval = any(k.startswith("eval/") for k in record)
    if step % self.log_every == 0 or step == self.total_steps or has_eval:
      self.writer.write(step, record)
      self.records.append({"step": step, **record})
    self.progress.update(step - self.progress.n)
    if postfix:
      self.progress.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

  def check_finite(self, step: int, state, data_state) -> None:
    """After K consecutive skipped (non-finite) steps: checkpoint and stop with a clear message."""
    skipped = int(to_host(optimizer_lib.consecutive_nonfinite(state.opt_state)))
    if skipped >= self.ctx.config.max_consecutive_nonfinite:
      self.save(step, state, data_state, force=True)
      self.checkpointer.wait()
      raise NonFiniteError(
          f"{self.name}: {skipped} consecutive steps had a non-finite loss or gradient (the "
          f"last at step {step}); they were skipped and a checkpoint was written to "
          f"{self.checkpointer.directory}. Lower the learning rate or inspect metrics.jsonl.")

  def close(self, panels: Mapping[str, tuple[str, ...]]) -> None:
    if self.progress is not None:
      self.progress.close()
    self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()
    if self.ctx.is_main and self.records:
      metrics_lib.plot_metrics(self.records, panels, os.path.join(self.dir, "metrics.png"),
                               title=f"{self.name}: {self.ctx.config.task.name}")


def interruptible(fn: Callable[[], Any], on_interrupt: Callable[[], None]):
  """Runs fn; on Ctrl-C or SIGTERM calls on_interrupt (e.g. save a checkpoint) and re-raises."""
  previous = signal.getsignal(signal.SIGTERM)

  def raise_interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, raise_interrupt)
  try:
    return fn()
  except KeyboardInterrupt:
    on_interrupt()
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)


def mean_over(values: Mapping[str, jax.Array] | list[Mapping[str, Any]]) -> dict[str, float]:
  """Mean of each key over a list of metric dicts."""
  keys = values[0].keys()
  return {k: float(np.mean([float(v[k]) for v in values])) for k in keys}
