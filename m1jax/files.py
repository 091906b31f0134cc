"""Result and state files written whole or not at all (a leaf: imports nothing of m1jax)."""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` (its folder created) through a temporary file and a rename, so a
  reader (another process of a run, a user, a rerun after a kill) sees the old file or the new
  one, never a partial one."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    with open(temporary, "w", newline="") as f:
      f.write(text)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
