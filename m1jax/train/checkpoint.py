"""Orbax checkpoints of the train state, the data-iterator state and run metadata."""

from __future__ import annotations

import os
import weakref
from typing import Any, Iterable

import orbax.checkpoint as ocp

# Every Checkpointer not yet closed: `close_all` finishes their in-flight saves after an error,
# so that no orbax thread is left running (it would keep the process from exiting).
_OPEN: weakref.WeakSet = weakref.WeakSet()


class Checkpointer:
  """Saves every `every_steps` steps (and on demand), keeps the newest `keep` plus the steps in
  `protected`, restores. `create`: make the directory when it is missing. Unfinished saves of a
  killed run (orbax tmp directories) are discarded on opening."""

  def __init__(self, directory: str, every_steps: int, keep: int = 2, *, create: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.protected: set[int] = set()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=every_steps, create=create,
                                             cleanup_tmp_directories=True))
    _OPEN.add(self)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict[str, Any], meta: dict[str, Any],
           force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); returns whether a checkpoint was written."""
    if step == self._manager.latest_step():
      return False
    saved = self._manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))
    if saved:
      self._rotate(keep_also=(step,))
    return saved

  def _rotate(self, keep_also: Iterable[int] = ()) -> None:
    steps = sorted(set(self._manager.all_steps()) | set(keep_also))
    kept = set(steps[-self.keep:]) | self.protected | set(keep_also)
    for step in steps:
      if step not in kept:
        self._manager.delete(step)

  def restore(self, step: int, abstract_state):
    """-> (state placed as abstract_state's shardings, data_state, meta)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return restored.state, restored.data, restored.meta

  def reload(self) -> None:
    """Re-reads the directory (after step directories were moved by hand)."""
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    if self in _OPEN:
      _OPEN.discard(self)
      self._manager.wait_until_finished()
      self._manager.close()


def close_all() -> None:
  """Finishes the in-flight saves of every open Checkpointer and closes it (after an error)."""
  for checkpointer in list(_OPEN):
    try:
      checkpointer.close()
    except Exception:  # pylint: disable=broad-except
      pass  # the error being handled is the one to report
