"""Orbax checkpoints of the train state, the data-iterator state and run metadata."""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every_steps` steps (and on demand), keeps the newest `keep`, restores."""

  def __init__(self, directory: str, every_steps: int, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict[str, Any], meta: dict[str, Any],
           force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); returns whether a checkpoint was written."""
    if step == self._manager.latest_step():
      return False
    return self._manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state):
    """-> (state placed as abstract_state's shardings, data_state, meta)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return restored.state, restored.data, restored.meta

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
