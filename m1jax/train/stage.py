"""A training stage (SFT or RL) in `workdir/<name>`: the one loop skeleton both stages run, and
what it owns: resume, checkpoints, metrics, progress, interruption and non-finite handling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from m1jax import files
from m1jax.train import checkpoint as checkpoint_lib
from m1jax.train import metrics as metrics_lib
from m1jax.train import optimizer as optimizer_lib
from m1jax.train import state as state_lib
from m1jax.train.context import Context
from m1jax.train.transfer import sync_processes, to_host

# step_fn(state, step) -> (state, metrics): one step of a stage (it draws its own data).
StepFn = Callable[[Any, int], tuple[Any, dict[str, float]]]


class NonFiniteError(RuntimeError):
  pass


class Interrupted(KeyboardInterrupt):
  """Ctrl-C or SIGTERM stopped a stage; `str()` is one line saying what was kept."""

  def __init__(self, signum: int, message: str = ""):
    super().__init__(message)
    self.signum = signum

  def __str__(self) -> str:
    return self.args[0] if self.args else ""


# <stage>/NONFINITE_MARKER names the checkpoint written at a non-finite stop; the next run sets
# that checkpoint apart in <stage>/nonfinite/<step> and resumes from the last one before it.
NONFINITE_MARKER = "nonfinite_stop.json"


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
    # A stage read from another run's directory (restore_params) is left as it is.
    self.resume_note = self._set_aside_nonfinite_stop() if directory is None else ""
    self.log_every = stage_cfg.log_every
    self.eval_every = stage_cfg.eval_every
    self.start_step = 0
    self.writer = None
    self.progress = None
    self.records: list[dict[str, Any]] = []
    self._t0 = time.time()
    self.complete_at_start = self.finished()  # a rerun of a finished stage has nothing to do

  # --- state -------------------------------------------------------------------------------------
  def _set_aside_nonfinite_stop(self) -> str:
    """Moves the checkpoint of an earlier non-finite stop to <stage>/nonfinite/<step>, so that
    the run resumes from the last checkpoint before it; returns what to say about it."""
    marker = os.path.join(self.dir, NONFINITE_MARKER)
    if not os.path.exists(marker):
      return ""
    with open(marker) as f:
      stopped = int(json.load(f)["step"])
    apart = os.path.join(self.dir, "nonfinite", str(stopped))
    written = stopped in self.checkpointer.all_steps()
    # Every process has read the marker and the steps before the main process moves them.
    sync_processes(f"m1jax: {self.name} non-finite stop read")
    if self.ctx.is_main:
      if written:
        shutil.rmtree(apart, ignore_errors=True)
        os.makedirs(os.path.dirname(apart), exist_ok=True)
        os.replace(os.path.join(self.checkpointer.directory, str(stopped)), apart)
      os.remove(marker)
    sync_processes(f"m1jax: {self.name} non-finite checkpoint set apart")
    self.checkpointer.reload()
    good = self.checkpointer.latest_step()
    where = (f"from step {good}, the last checkpoint before it" if good is not None
             else "from the start: no checkpoint was written before it")
    kept = f" (that state is kept apart in {apart})" if written else ""
    return (f"{self.name}: the previous run stopped on non-finite steps at step {stopped}{kept}; "
            f"resuming {where}")

  def finished(self) -> bool:
    return self.checkpointer.latest_step() == self.total_steps

  def restore_or_create(self, make_params: Callable[[], Any], data_iter):
    """The state to start from: the latest checkpoint (restoring `data_iter`'s position too) when
    there is one, else a new state from make_params()."""
    latest = self.checkpointer.latest_step()
    if self.resume_note:
      logging.warning("%s", self.resume_note)
    if latest is not None:
      target = state_lib.abstract_state(self.ctx.model_cfg, self.optimizer, self.shardings)
      state, data_state, meta = self.checkpointer.restore(latest, target)
      if meta.get("seed") != self.ctx.config.seed:
        raise ValueError(f"{self.dir}: checkpoint was written with seed {meta.get('seed')}, "
                         f"config.seed={self.ctx.config.seed}; use another --workdir")
      self.start_step = latest
      data_iter.set_state(data_state)
      logging.info("%s: resuming from step %d", self.name, latest)
      return state
    create = jax.jit(lambda p: state_lib.create(p, self.optimizer), out_shardings=self.shardings)
    return create(make_params())

  def final_params(self):
    """The params of this stage's last checkpoint (for the next stage)."""
    target = state_lib.abstract_state(self.ctx.model_cfg, self.optimizer, self.shardings)
    state, _, _ = self.checkpointer.restore(self.checkpointer.latest_step(), target)
    return state.params

  def save(self, step: int, state, data_state: Mapping[str, Any], force: bool = False) -> None:
    meta = {"seed": self.ctx.config.seed, "stage": self.name, "step": int(step),
            "config": json.loads(self.ctx.config.to_json_best_effort())}
    self.checkpointer.save(step, state, dict(data_state), meta, force=force)

  def save_if_consistent(self, state, step: int, data_state, updates_per_step: int = 1) -> str:
    """On interruption: checkpoint `state` if it is exactly `step` steps in (not mid-step);
    returns one line saying where a rerun resumes."""
    try:
      applied = int(jax.device_get(state.step))
    except RuntimeError:  # buffers donated to a step that did not finish
      applied = -1
    if applied == step * updates_per_step and step > 0:
      self.save(step, state, data_state, force=True)
      self.checkpointer.wait()
      return (f"{self.name}: interrupted after step {step}; checkpoint written: a rerun resumes "
              f"from step {step} ({self.checkpointer.directory})")
    latest = self.checkpointer.latest_step()
    if latest is None:
      return (f"{self.name}: interrupted in step {step + 1}; no checkpoint yet: a rerun starts "
              "this stage from the beginning")
    return (f"{self.name}: interrupted in step {step + 1}; a rerun resumes from step {latest}, "
            f"the latest checkpoint ({self.checkpointer.directory})")

  # --- the loop ------------------------------------------------------------------------------------
  def run(self, state, data_iter, step_fn: StepFn, *,
          evaluate: Callable[[Any], dict[str, float]], panels: Sequence[metrics_lib.Panel],
          postfix: Sequence[str] = (), updates_per_step: int = 1):
    """Runs the stage from self.start_step to total_steps; returns the final state.

    Held-out evaluation (`evaluate(params)`) at step 0 and every `eval_every` steps and at the
    end; per step: `step_fn`, log (the keys in `postfix` on the progress bar), non-finite check,
    checkpoint (none while updates are being skipped: the last one before them stays the one
    to resume from). Ctrl-C or SIGTERM checkpoints the last completed step (when the state is
    exactly there) and raises Interrupted. Any error finishes the in-flight checkpoint first.
    `updates_per_step`: optimizer steps per stage step.
    """
    self.open()
    boundary = {"step": self.start_step, "data": data_iter.get_state()}  # last completed step

    def loop():
      nonlocal state
      step = self.start_step
      if step == 0:
        self.log(0, evaluate(state.params))
      while step < self.total_steps:
        state, metrics = step_fn(state, step)
        step += 1
        data_state = data_iter.get_state()
        boundary.update(step=step, data=data_state)
        if step == self.total_steps or (self.eval_every and step % self.eval_every == 0):
          metrics.update(evaluate(state.params))
        self.log(step, metrics, postfix={k: metrics[k] for k in postfix})
        skipping = self.check_finite(step, state, data_state)
        if not skipping or step == self.total_steps:
          self.save(step, state, data_state, force=step == self.total_steps)

    try:
      interruptible(loop, lambda: self.save_if_consistent(
          state, boundary["step"], boundary["data"], updates_per_step=updates_per_step))
    except BaseException:
      if self.progress is not None:
        self.progress.close()
      self.checkpointer.close()
      raise
    self.close(panels)
    return state

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
    if has_eval and self.ctx.is_main:
      self.progress.write(eval_line(self.name, step, self.total_steps, record))
    self.progress.update(step - self.progress.n)
    if postfix:
      self.progress.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

  def check_finite(self, step: int, state, data_state) -> bool:
    """Whether the latest updates were skipped (non-finite). After K consecutive ones: writes a
    checkpoint marked as the non-finite stop (the last one before it is kept whatever
    checkpoint.keep says) and stops with a clear message."""
    skipped = int(to_host(optimizer_lib.consecutive_nonfinite(state.opt_state)))
    if skipped >= self.ctx.config.max_consecutive_nonfinite:
      good = self.checkpointer.latest_step()
      self.checkpointer.protected = {good} if good is not None else set()
      if self.ctx.is_main:
        files.write_atomically(os.path.join(self.dir, NONFINITE_MARKER),
                               json.dumps({"step": step, "last_good": good}))
      self.save(step, state, data_state, force=True)
      self.checkpointer.wait()
      resume = (f"step {good}, the last checkpoint before them" if good is not None
                else "the start (there is no checkpoint before them)")
      raise NonFiniteError(
          f"{self.name}: {skipped} consecutive steps had a non-finite loss or gradient (the "
          f"last at step {step}); they were skipped, and the state at the stop was checkpointed "
          f"as step {step} in {self.checkpointer.directory}, marked as a non-finite stop. A rerun "
          f"with the same --workdir sets it apart and resumes from {resume}, and may change "
          f"this stage's settings: lower {self.name}.optimizer.learning_rate, or inspect "
          "metrics.jsonl.")
    return skipped > 0

  def close(self, panels: Sequence[metrics_lib.Panel]) -> None:
    if self.progress is not None:
      self.progress.close()
    self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()
    if self.ctx.is_main and self.records:
      metrics_lib.plot_metrics(self.records, panels, os.path.join(self.dir, "metrics.png"),
                               title=metrics_lib.plot_title(self.ctx.config, self.name))


def eval_line(name: str, step: int, total_steps: int, record: Mapping[str, Any]) -> str:
  """The line printed at each held-out evaluation ("sft step 100/200: held-out accuracy ...")."""
  return (f"{name} step {step}/{total_steps}: held-out accuracy {record['eval/accuracy']:.3f}, "
          f"reward {record['eval/reward']:.3f}, mean length {record['eval/length']:.1f}")


def interruptible(fn: Callable[[], Any], on_interrupt: Callable[[], str | None]):
  """Runs fn; on Ctrl-C or SIGTERM calls on_interrupt (e.g. save a checkpoint) and raises
  Interrupted with the signal and the line on_interrupt returns."""
  previous = signal.getsignal(signal.SIGTERM)

  def raise_interrupt(signum, frame):
    del frame
    raise Interrupted(signum)

  signal.signal(signal.SIGTERM, raise_interrupt)
  try:
    return fn()
  except KeyboardInterrupt as e:
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    raise Interrupted(signum, on_interrupt() or "") from None
  finally:
    signal.signal(signal.SIGTERM, previous)


def restore_params(ctx: Context, stage_dir: str, stage_cfg: ml_collections.ConfigDict):
  """Final params of the stage saved in `stage_dir` (e.g. an earlier run's <workdir>/sft), for a
  model `ctx.model_cfg` trained with `stage_cfg` (its optimizer shapes the checkpoint). Raises
  ValueError when there is no checkpoint."""
  directory = os.path.join(os.path.abspath(stage_dir), "checkpoints")
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise ValueError(f"no checkpoint in {directory}")  # checked before orbax opens it
  if os.path.exists(os.path.join(stage_dir, NONFINITE_MARKER)):
    raise ValueError(f"{stage_dir} stopped on non-finite steps: its latest checkpoint is not one "
                     "to start from; rerun that stage with the same --workdir first")
  optimizer = optimizer_lib.make_optimizer(stage_cfg.optimizer, stage_cfg.steps,
                                           injectable=bool(stage_cfg.get("stages")))
  stage = Stage(ctx, os.path.basename(os.path.normpath(stage_dir)), stage_cfg.steps, optimizer,
                stage_cfg, directory=stage_dir)
  try:
    return stage.final_params()
  finally:
    stage.checkpointer.close()
