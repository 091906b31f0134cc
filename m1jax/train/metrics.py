"""Per-step metrics: JSONL + TensorBoard event files, and a PNG of the main curves."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


class MetricsWriter:
  """Appends {"step": s, **metrics} lines to `workdir/metrics.jsonl` and TensorBoard scalars.

  On resume, lines after the restored step are dropped first (they are about to be re-run).
  Only the main process writes (others get a writer that does nothing).
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True,
               enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step] if resume_step else []
    with open(self.path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_python(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 and not isinstance(value, str) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN / inf
  return value


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(records: Sequence[Mapping[str, Any]], panels: Mapping[str, Sequence[str]],
                 path: str, title: str = "") -> None:
  """One subplot per panel name, each plotting the listed metric keys vs step, to a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (panel, keys) in zip(axes[0], panels.items()):
    for key in keys:
      points = [(r["step"], r[key]) for r in records
                if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
