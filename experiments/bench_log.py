"""The benchmark scripts' log: every line printed and appended to a file in --out_dir."""

from typing import Callable


def tee(path: str) -> Callable[[str], None]:
  """log(msg) prints msg and appends it to `path` (flushed per line, so a cut-short run keeps
  everything it printed)."""

  def log(msg: str):
    print(msg, flush=True)
    with open(path, "a") as f:
      f.write(msg + "\n")

  return log
