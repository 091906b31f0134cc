"""Staged length-window expansion (`rl.stages`): which stage the RL loop is in and when it moves
on. Stage i runs with `schema.stage_rl_configs(rl)[i]` (its window `max_new_tokens`, loss,
learning rate, ...); it ends after its `steps`, or when the mean of its `advance_when.metric` over
its last `window` steps falls below `below` (rises above `above`), whichever comes first; the last
stage runs until rl.steps. The schedule's state (stage, its first step, the rule's recent values)
is saved with every checkpoint, so a resumed run moves on at the same step as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from m1jax.train import schema


class StageSchedule:
  """The stage of a staged RL run. `index`: the current stage; `start`: the number of steps done
  before it began; `history`: its rule metric's values over its last `window` steps."""

  def __init__(self, rl: ml_collections.ConfigDict):
    self.stages = schema.rl_stages(rl)
    self.configs = schema.stage_rl_configs(rl)
    self.index, self.start, self.history = 0, 0, []

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The rl config of the current stage."""
    return self.configs[self.index]

  def end_step(self, steps_done: int, metrics: Mapping[str, Any]) -> str | None:
    """Takes the metrics of the step that made it `steps_done` steps; when that step ended the
    stage, moves to the next one and returns a line saying so (else None)."""
    stage = self.stages[self.index]
    rule = stage.advance_when
    ruled = rule.below is not None or rule.above is not None
    done = steps_done - self.start
    if ruled:
      self.history = (self.history + [float(metrics[rule.metric])])[-rule.window:]
    reason = None
    if stage.steps and done >= stage.steps:
      reason = f"after its {stage.steps} steps"
    elif ruled and done >= max(rule.window, rule.min_steps):
      mean = sum(self.history) / len(self.history)
      if (rule.below is not None and mean < rule.below) or (rule.above is not None
                                                            and mean > rule.above):
        side = f"< {rule.below:g}" if rule.below is not None else f"> {rule.above:g}"
        reason = f"{rule.metric} {mean:.3g} {side} (mean of its last {rule.window} steps)"
    if reason is None:
      return None
    before = self.config.max_new_tokens
    self.index, self.start, self.history = self.index + 1, steps_done, []
    return (f"rl step {steps_done}: stage {self.index - 1} ends {reason}; stage {self.index} "
            f"starts (max_new_tokens {before} -> {self.config.max_new_tokens})")

  def get_state(self) -> dict[str, Any]:
    return {"index": self.index, "start": self.start, "history": list(self.history)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state["index"] >= len(self.stages):
      raise ValueError(f"the checkpoint is in stage {state['index']} of rl.stages; the config "
                       f"has {len(self.stages)} stages (use the config the run started with)")
    self.index, self.start, self.history = state["index"], state["start"], list(state["history"])


class StagedData:
  """What a staged run's checkpoints keep besides the train state: the prompt iterator's position
  and the stage schedule (the get_state / set_state pair `Stage` saves and restores)."""

  def __init__(self, prompts, schedule: StageSchedule):
    self.prompts, self.schedule = prompts, schedule

  def get_state(self) -> dict[str, Any]:
    return {"prompts": self.prompts.get_state(), "stages": self.schedule.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "stages" not in state:
      raise ValueError("the checkpoint was written by a run without rl.stages")
    self.prompts.set_state(state["prompts"])
    self.schedule.set_state(state["stages"])
