"""Fig. 2 at small scale: RL objectives compared from one SFT start (CISPO vs DAPO vs GRPO, GSPO).

`run_grid` trains one RL run per (objective, updates per batch, seed) with the training driver in
worker processes (resumable: finished runs are skipped); `collect` reads their held-out accuracy
curves; `steps_to_reach` and `plot` summarise them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import traceback
from typing import Any, Mapping, Sequence

import numpy as np

from m1jax.train import driver, metrics, schema

# The paper's Fig. 2 (Qwen2.5-32B-base zero-RL, AIME 2024 avg@32), points read from the plot.
PAPER_FIG2 = {
    "grpo": [(0, 1.7), (128, 16.9), (256, 20.8), (512, 20.4), (1024, 23.5), (1472, 23.5)],
    "dapo": [(0, 1.5), (128, 14.8), (384, 25.7), (640, 28.3), (960, 34.4), (1472, 34.0)],
    "cispo": [(0, 1.7), (128, 24.1), (256, 26.4), (448, 34.4), (768, 36.5), (1024, 44.6),
              (1472, 38.3)],
}


@dataclasses.dataclass(frozen=True)
class Run:
  kind: str
  updates_per_batch: int
  seed: int
  is_ratio_cap: float | None = None  # CISPO's cap when it differs from the config's

  @property
  def label(self) -> str:
    return self.kind if self.is_ratio_cap is None else f"{self.kind} (cap {self.is_ratio_cap:g})"

  @property
  def name(self) -> str:
    cap = "" if self.is_ratio_cap is None else f"_cap{self.is_ratio_cap:g}"
    return f"{self.kind}{cap}_mu{self.updates_per_batch}_seed{self.seed}"


def train_run(config_path: str, overrides: Mapping[str, Any], workdir: str) -> str:
  """Trains one run with the training driver, its output in workdir/stdout.log; returns "" or the
  error it failed with. Module-level, so that worker processes can run it."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "stdout.log"), "w") as log, \
      contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    try:
      config = schema.load_config(config_path, overrides)
      print(driver.format_summary(driver.run_from_config(config, workdir)))
    except Exception as e:  # pylint: disable=broad-except  (reported by the caller)
      traceback.print_exc()
      return f"{type(e).__name__}: {e}"
  return ""


def run_grid(config_path: str, sft_dir: str, out_dir: str, kinds: Sequence[str],
             updates: Sequence[int], seeds: Sequence[int], overrides: Mapping[str, Any] = (),
             workers: int = 2, extra_cispo_caps: Sequence[float] = (), log=print) -> list[Run]:
  """Trains every run (skipping finished ones) in `workers` processes.

  overrides: config keys set in every run ({"rl.steps": 40}); extra_cispo_caps: further CISPO
  runs, one per absolute IS-weight cap, beside the config's.
  """
  runs = [Run(k, mu, s) for mu in updates for s in seeds for k in kinds]
  runs += [Run("cispo", mu, s, cap) for cap in extra_cispo_caps for mu in updates for s in seeds]
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out_dir, "jax_cache"))
  pending, jobs = [], []
  for run in runs:
    workdir = os.path.join(out_dir, "runs", run.name)
    if os.path.exists(os.path.join(workdir, "summary.json")):
      log(f"{run.name}: done earlier")
      continue
    run_overrides = {**dict(overrides), "mode": "rl", "rl.init_from": sft_dir,
                     "rl.loss.kind": run.kind, "rl.updates_per_batch": run.updates_per_batch,
                     "seed": run.seed, "progress": False}
    if run.is_ratio_cap is not None:
      run_overrides["rl.loss.is_ratio_cap"] = run.is_ratio_cap
    pending.append(run)
    jobs.append((config_path, run_overrides, workdir))
  context = multiprocessing.get_context("spawn")  # a fresh JAX runtime per worker
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    for run, error in zip(pending, pool.map(train_run, *zip(*jobs)) if jobs else ()):
      log(f"{run.name}: {'done' if not error else f'FAILED ({error}), see its stdout.log'}")
      if error:
        raise RuntimeError(f"run {run.name} failed: {error}")
  return runs


def collect(out_dir: str, runs: Sequence[Run]) -> dict[tuple[str, int], dict[str, Any]]:
  """{(label, mu): {"steps": [S], "accuracy": [seeds, S], "stage_starts": [(stage, step)]}}
  from each run's eval records (stage_starts: of any seed, with rl.stages)."""
  curves: dict[tuple[str, int], dict[str, list]] = {}
  for run in runs:
    path = os.path.join(out_dir, "runs", run.name, "rl", "metrics.jsonl")
    with open(path) as f:
      records = [json.loads(line) for line in f]
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    steps, accuracy = zip(*evals)
    entry = curves.setdefault((run.label, run.updates_per_batch),
                              {"steps": steps, "accuracy": [], "stage_starts": set()})
    entry["stage_starts"].update(metrics.stage_starts(records))
    if tuple(steps) != tuple(entry["steps"]):
      raise ValueError(f"{run.name}: evaluated at steps {steps}, others at {entry['steps']}")
    entry["accuracy"].append(accuracy)
  return {k: {"steps": np.asarray(v["steps"]), "accuracy": np.asarray(v["accuracy"]),
              "stage_starts": sorted(v["stage_starts"])} for k, v in curves.items()}


def steps_to_reach(steps: np.ndarray, values: np.ndarray, threshold: float) -> float:
  """First step where the (linearly interpolated) curve reaches `threshold`; nan if never."""
  for i in range(len(values)):
    if values[i] >= threshold:
      if i == 0:
        return float(steps[0])
      frac = (threshold - values[i - 1]) / (values[i] - values[i - 1])
      return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))
  return float("nan")


def summary_rows(curves, reference_kind: str = "dapo") -> list[dict]:
  """Per (kind, mu): final mean accuracy, best mean, and steps to reach the reference objective's
  final mean accuracy (the paper's comparison: CISPO reaches DAPO's final score in half the
  steps)."""
  rows = []
  for mu in sorted({mu for _, mu in curves}, reverse=True):
    ref = curves.get((reference_kind, mu))
    threshold = float(ref["accuracy"].mean(0)[-1]) if ref is not None else float("nan")
    ref_steps = (steps_to_reach(ref["steps"], ref["accuracy"].mean(0), threshold)
                 if ref is not None else float("nan"))
    for (kind, m), c in sorted(curves.items()):
      if m != mu:
        continue
      mean = c["accuracy"].mean(0)
      reach = steps_to_reach(c["steps"], mean, threshold)
      rows.append({"kind": kind, "updates_per_batch": mu, "seeds": c["accuracy"].shape[0],
                   "start": float(mean[0]), "final_mean": float(mean[-1]),
                   "final_std": float(c["accuracy"][:, -1].std()), "best_mean": float(mean.max()),
                   "threshold": threshold, "steps_to_threshold": reach,
                   "ratio_to_reference": reach / ref_steps if ref_steps else float("nan")})
  return rows


def plot(curves, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  mus = sorted({mu for _, mu in curves}, reverse=True)
  colors = {"cispo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green", "gspo": "tab:purple"}
  fig, axes = plt.subplots(1, len(mus) + 1, figsize=(5 * (len(mus) + 1), 3.8), squeeze=False)
  for ax, mu in zip(axes[0], mus):
    for (kind, m), c in sorted(curves.items()):
      if m != mu:
        continue
      mean, std = c["accuracy"].mean(0), c["accuracy"].std(0)
      color = colors.get(kind, "tab:orange")
      ax.plot(c["steps"], mean, label=f"{kind} ({c['accuracy'].shape[0]} seeds)", color=color,
              linestyle="--" if "cap" in kind else "-")
      ax.fill_between(c["steps"], mean - std, mean + std, alpha=0.2, color=color)
      metrics.mark_stages(ax, c.get("stage_starts", ()))
    ax.set_title(f"ours: {mu} update(s) per generation batch")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  ax = axes[0][-1]
  for kind, points in PAPER_FIG2.items():
    steps, scores = zip(*points)
    ax.plot(steps, scores, marker="o", label=kind, color=colors.get(kind))
  ax.set_title("paper Fig. 2 (Qwen2.5-32B, AIME 2024)")
  ax.set_xlabel("RL step")
  ax.set_ylabel("AIME 2024 avg@32")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
