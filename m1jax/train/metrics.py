"""Per-step metrics: JSONL + TensorBoard event files, and a PNG of the main curves."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

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
  """The records of a metrics.jsonl. A torn last line (a write cut short by a kill: no newline
  at its end and not JSON) is left out; any other bad line raises ValueError naming it."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines) and not line.endswith("\n"):
        break  # torn: the MetricsWriter of a resume rewrites the file without it
      raise ValueError(f"{path}:{number}: not a metrics record ({e.msg} at column {e.colno})"
                       ) from None
  return records


class Panel(NamedTuple):
  """One subplot of metrics.png: `keys` against step on the left y axis (labelled `ylabel`), and
  `right_keys` on a second y axis (`right_ylabel`) for a quantity of another scale."""
  title: str
  ylabel: str
  keys: tuple[str, ...]
  right_ylabel: str = ""
  right_keys: tuple[str, ...] = ()


# Line style and marker of the n-th curve of an axis: curves that coincide stay distinguishable.
_STYLES = (("-", "o", 4), ("--", "x", 7), (":", "^", 5), ("-.", "s", 4))


def _series(records, key):
  points = [(r["step"], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
  return tuple(zip(*points)) if points else None


def _plot_keys(ax, records, keys, ylabel, first_color=0):
  """Plots `keys` on `ax` in colours C{first_color}, ...; a curve identical to an earlier one of
  the axis says so in its label. Returns the number of keys."""
  drawn = {}
  for n, key in enumerate(keys):
    series = _series(records, key)
    if series is None:
      continue
    same = [k for k, s in drawn.items() if s == series]
    linestyle, marker, size = _STYLES[n % len(_STYLES)]
    ax.plot(*series, label=key + (f" (= {same[0]})" if same else ""), color=f"C{first_color + n}",
            linestyle=linestyle, marker=marker if len(series[0]) < 30 else None,
            markersize=size, markerfacecolor="none")
    drawn[key] = series
  ax.set_ylabel(ylabel)
  return len(keys)


def stage_starts(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
  """[(stage index, steps done before it began)] of the stages of a staged RL run (rl.stages)
  seen in `records`, from their `stage` and `stage_step` keys (exact with any log_every)."""
  starts = {}
  for r in records:
    if isinstance(r.get("stage"), (int, float)) and isinstance(r.get("stage_step"), (int, float)):
      starts.setdefault(int(r["stage"]), int(r["step"] - r["stage_step"]))
  return sorted(starts.items())


def mark_stages(ax, starts: Sequence[tuple[int, int]]) -> None:
  """A dotted vertical line, labelled "stage i", where each stage after the first begins."""
  for index, start in starts:
    if index == 0:
      continue
    ax.axvline(start, color="0.4", linestyle=":", linewidth=1.2, label=f"_stage {index}")
    ax.text(start, 0.98, f" stage {index}", transform=ax.get_xaxis_transform(), fontsize=7,
            color="0.3", va="top", ha="left")


def figure(records: Sequence[Mapping[str, Any]], panels: Sequence[Panel], title: str = ""):
  """The matplotlib Figure of `panels` (one subplot each) over `records` ({"step": s, key: v});
  the boundaries of a staged RL run's stages are marked on every panel."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cols = min(len(panels), 3)
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows + 0.5), squeeze=False)
  for ax in axes.flat[len(panels):]:
    fig.delaxes(ax)
  starts = stage_starts(records)
  for ax, panel in zip(axes.flat, panels):
    mark_stages(ax, starts)
    colors = _plot_keys(ax, records, panel.keys, panel.ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if panel.right_keys:
      right = ax.twinx()
      _plot_keys(right, records, panel.right_keys, panel.right_ylabel, first_color=colors)
      more_handles, more_labels = right.get_legend_handles_labels()
      handles, labels = handles + more_handles, labels + more_labels
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if handles:
      ax.legend(handles, labels, fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def plot_metrics(records: Sequence[Mapping[str, Any]], panels: Sequence[Panel], path: str,
                 title: str = "") -> None:
  """Writes `figure(records, panels, title)` to the PNG at `path`."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = figure(records, panels, title)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_title(config, stage: str) -> str:
  """The title of a stage's metrics.png: task, model and the settings that shape the curves."""
  m = config.model
  model = (f"model {os.path.basename(os.path.normpath(m.hf_dir))}" if m.hf_dir else
           f"model {m.num_hidden_layers} layers x {m.hidden_size}, "
           f"{m.num_local_experts} experts (top {m.num_experts_per_tok})")
  s = config[stage]
  o = s.optimizer
  lr = f"lr {o.learning_rate:g} ({o.schedule}, warmup {o.warmup_steps}, clip {o.grad_clip:g})"
  if stage == "sft":
    settings = f"batch {s.batch_size}, {s.steps} steps"
  else:
    from m1jax.rl import losses  # pylint: disable=g-import-not-at-top
    defaults = {f.name: f.default for f in dataclasses.fields(losses.LossConfig)}
    loss = s.loss.to_dict()
    extra = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in loss.items()
             if k != "kind" and v is not None
             and (v != defaults[k] or (k == "is_ratio_cap" and loss["kind"] == "cispo"))]
    settings = (f"{loss['kind']}{' (' + ', '.join(extra) + ')' if extra else ''}, "
                f"{s.prompts_per_step} prompts x {s.samples_per_prompt} samples, "
                f"{s.updates_per_batch} updates/batch, advantage {s.advantage}, "
                f"{s.steps} steps")
    if s.get("stages"):
      from m1jax.train import schema  # pylint: disable=g-import-not-at-top
      windows = " -> ".join(str(c.max_new_tokens) for c in schema.stage_rl_configs(s))
      settings += f", {len(s.stages)} stages (max_new_tokens {windows})"
  return f"{stage} on {config.task.name}: {settings}, {lr}\n{model}, seed {config.seed}"
