"""Fig. 2: RL objectives compared from one SFT start (CISPO vs DAPO vs GRPO, GSPO).

Two grids share the launcher (`run_jobs`: worker processes, finished runs skipped, a deadline
that interrupts runs cleanly so that the next call resumes them from their checkpoints):

- the small CPU grid, one run per (objective, updates per batch, seed): `run_grid`, `collect`,
  `summary_rows`, `plot`;
- the GPU grid, one run per (arm, learning rate, seed), an arm being an objective plus config
  changes (`GRID_ARMS`: the four objectives, CISPO with the lower half of the trust region,
  CISPO and DAPO at rollout lag 2): `grid_runs`, `collect_grid`, `best_learning_rates`,
  `bootstrap_ratio`, `grid_rows`, `plot_grid`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
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
  """Trains one run with the training driver, its output appended to workdir/stdout.log;
  returns "" or the error it failed with. Module-level, so that worker processes can run it."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "stdout.log"), "a") as log, \
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
  jobs = []
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
    jobs.append(train_job(run.name, config_path, run_overrides, workdir))
  unfinished = run_jobs(jobs, workers, log=log)
  if unfinished:
    raise RuntimeError(f"runs {unfinished} did not finish")
  return runs


def _train_run_process(config_path: str, overrides: Mapping[str, Any], workdir: str) -> None:
  """A worker process's body: train_run with everything the process prints (native logs
  included) appended to workdir/stdout.log; exit status 1 on failure, 130 when interrupted (the
  driver has saved what it could: its one-line account ends the log)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "stdout.log"), "a") as log:
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
  try:
    sys.exit(1 if train_run(config_path, overrides, workdir) else 0)
  except KeyboardInterrupt as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(130)


def train_job(name: str, config_path: str, overrides: Mapping[str, Any], workdir: str):
  """A run_jobs job that trains one run (train_run) in its own process."""
  return (name, (config_path, dict(overrides), workdir), workdir)


def run_jobs(jobs: Sequence[tuple[str, tuple, str]], workers: int = 1,
             deadline: float | None = None, log=print, target=_train_run_process,
             grace_s: float = 120.0) -> list[str]:
  """Runs jobs (name, args of `target`, workdir: train_job), `workers` at a time, each
  target(*args) in a fresh process (a fresh JAX runtime); returns the names of those not
  finished.

  A job that fails raises RuntimeError naming its stdout.log (after the running ones finish). At
  `deadline` (time.time() seconds) no further job starts and the running ones get SIGINT, so
  the training driver saves its checkpoint before exiting (killed after `grace_s`); a later call
  resumes them.
  """
  context = multiprocessing.get_context("spawn")
  queue, running, unfinished, failed = list(jobs), {}, [], []
  stop = {"deadline": deadline}

  def on_sigterm(signum, frame):  # the caller's own time limit: stop as at the deadline
    del signum, frame
    stop["deadline"] = time.time()

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    _run_queue(context, queue, running, unfinished, failed, stop, workers, log, target, grace_s)
  finally:
    signal.signal(signal.SIGTERM, previous)
  unfinished += [name for name, *_ in queue]
  if failed:
    raise RuntimeError(f"runs {failed} failed; see their stdout.log")
  return unfinished


def _run_queue(context, queue, running, unfinished, failed, stop, workers, log, target,
               grace_s):
  past_deadline = lambda: stop["deadline"] is not None and time.time() >= stop["deadline"]
  while queue or running:
    while queue and len(running) < workers and not failed and not past_deadline():
      name, args, workdir = queue.pop(0)
      process = context.Process(target=target, args=args)
      process.start()
      running[name] = (process, workdir)
      log(f"{name}: started")
    if past_deadline() and running:
      log(f"deadline: interrupting {sorted(running)} (they resume on the next call)")
      for process, _ in running.values():
        os.kill(process.pid, signal.SIGINT)
      for name, (process, _) in running.items():
        process.join(grace_s)
        if process.is_alive():
          process.kill()
          process.join()
        unfinished.append(name)
      running.clear()
      break
    for name, (process, workdir) in list(running.items()):
      if not process.is_alive():
        process.join()
        del running[name]
        if process.exitcode == 0:
          log(f"{name}: done")
        else:
          failed.append(name)
          log(f"{name}: FAILED (exit {process.exitcode}), see {workdir}/stdout.log")
    if (past_deadline() or failed) and not running:
      break
    time.sleep(0.2)


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


# --- The GPU grid: arms x learning rates x seeds ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arm:
  """An objective plus config changes. lr_from: an arm whose best learning rate this one takes
  (it runs at that rate only, once every cell of that arm has finished), or "" for the grid's."""
  kind: str
  overrides: tuple[tuple[str, Any], ...] = ()
  lr_from: str = ""


GRID_ARMS = {
    "cispo": Arm("cispo"),
    "dapo": Arm("dapo"),
    "grpo": Arm("grpo"),
    "gspo": Arm("gspo"),
    # CISPO with only the lower half of PPO's trust region: drops tokens with A < 0 and
    # r < 1 - 0.2 (the upper bound 1 + 1e6 never binds).
    "cispo_trust_lower": Arm("cispo", (("rl.loss.token_mask", "ppo_trust_region"),
                                       ("rl.loss.clip_eps_low", 0.2),
                                       ("rl.loss.clip_eps_high", 1e6)), lr_from="cispo"),
    "cispo_lag2": Arm("cispo", (("rl.rollout_lag", 2),), lr_from="cispo"),
    "dapo_lag2": Arm("dapo", (("rl.rollout_lag", 2),), lr_from="dapo"),
}

# Training metrics (metrics.jsonl keys, per RL step) the grid's second panel shows.
GRID_METRICS = ("approx_kl_k3", "entropy", "clip_frac_low", "clip_frac_high",
                "trust_region_masked_frac", "is_weight_max")


@dataclasses.dataclass(frozen=True)
class GridRun:
  arm: str
  learning_rate: float
  seed: int

  @property
  def name(self) -> str:
    return f"{self.arm}_lr{self.learning_rate:g}_seed{self.seed}"


def grid_finished(out_dir: str, run: GridRun) -> bool:
  return os.path.exists(os.path.join(out_dir, "runs", run.name, "summary.json"))


def grid_runs(out_dir: str, arms: Sequence[str], learning_rates: Sequence[float],
              seeds: Sequence[int]) -> tuple[list[GridRun], list[str]]:
  """(the runs of the grid that can be named now, arms still waiting for their lr_from arm's
  cells). Arms without lr_from run at every learning rate; the others at their lr_from arm's
  best learning rate (best_learning_rates over its finished cells)."""
  unknown = sorted(set(arms) - set(GRID_ARMS))
  if unknown:
    raise ValueError(f"arms: unknown {unknown}; choose from {sorted(GRID_ARMS)}")
  runs, waiting = [], []
  for arm in arms:
    source = GRID_ARMS[arm].lr_from
    if not source:
      runs += [GridRun(arm, lr, seed) for lr in learning_rates for seed in seeds]
      continue
    cells = [GridRun(source, lr, seed) for lr in learning_rates for seed in seeds]
    if not all(grid_finished(out_dir, r) for r in cells):
      waiting.append(arm)
      continue
    best = best_learning_rates(collect_grid(out_dir, cells))[source]
    runs += [GridRun(arm, best, seed) for seed in seeds]
  return runs, waiting


def grid_overrides(run: GridRun, sft_dir: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The config keys of one grid run (the grid's common overrides, then the arm's)."""
  arm = GRID_ARMS[run.arm]
  return {**dict(overrides), "mode": "rl", "rl.init_from": sft_dir, "rl.loss.kind": arm.kind,
          "rl.optimizer.learning_rate": run.learning_rate, "seed": run.seed, "progress": False,
          **dict(arm.overrides)}


def collect_grid(out_dir: str, runs: Sequence[GridRun]) -> dict[tuple[str, float], dict]:
  """{(arm, lr): {"steps": [S] eval steps, "accuracy": [seeds, S], "train_steps": [R],
  metric: [seeds, R] for each GRID_METRICS key the runs log}} of finished runs."""
  cells: dict[tuple[str, float], list[list[dict]]] = {}
  for run in runs:
    if not grid_finished(out_dir, run):
      continue
    records = metrics.read_jsonl(os.path.join(out_dir, "runs", run.name, "rl", "metrics.jsonl"))
    cells.setdefault((run.arm, run.learning_rate), []).append(records)
  curves = {}
  for key, seeds in cells.items():
    evals = [[(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
             for records in seeds]
    steps = [tuple(s for s, _ in e) for e in evals]
    if len(set(steps)) != 1:
      raise ValueError(f"{key}: seeds evaluated at different steps {sorted(set(steps))}")
    curve = {"steps": np.asarray(steps[0]),
             "accuracy": np.asarray([[a for _, a in e] for e in evals])}
    train = [[r for r in records if "approx_kl_k3" in r] for records in seeds]
    length = min(len(t) for t in train)
    curve["train_steps"] = np.asarray([r["step"] for r in train[0][:length]])
    for name in GRID_METRICS:
      if all(name in r for t in train for r in t[:length]):
        curve[name] = np.asarray([[r[name] for r in t[:length]] for t in train])
    curves[key] = curve
  return curves


def best_learning_rates(curves) -> dict[str, float]:
  """{arm: the learning rate whose seed-mean accuracy, averaged over the eval steps (the area
  under the curve, less noisy than the last point), is highest}."""
  best: dict[str, tuple[float, float]] = {}
  for (arm, lr), c in curves.items():
    score = float(c["accuracy"].mean())
    if arm not in best or score > best[arm][1]:
      best[arm] = (lr, score)
  return {arm: lr for arm, (lr, _) in best.items()}


def bootstrap_ratio(steps: np.ndarray, cispo: np.ndarray, dapo: np.ndarray,
                    samples: int = 2000, seed: int = 0) -> dict[str, float]:
  """Steps for CISPO to reach DAPO's final accuracy over DAPO's steps to reach it, from the
  seed-mean curves (accuracy [seeds, S] at `steps`), with a bootstrap over seeds (each arm's
  seeds resampled with replacement, the threshold recomputed each time).

  Returns {"ratio", "low", "high" (the 2.5 and 97.5 percentiles), "never" (share of resamples in
  which CISPO's mean curve never reached the threshold: ratio inf)}.
  """
  def ratio(c, d):
    threshold = d.mean(0)[-1]
    dapo_steps = steps_to_reach(steps, d.mean(0), threshold)
    reach = steps_to_reach(steps, c.mean(0), threshold)
    if not dapo_steps:  # DAPO at its final level from the first evaluation on
      return float("nan")
    return np.inf if np.isnan(reach) else reach / dapo_steps
  rng = np.random.default_rng(seed)
  draws = np.asarray([ratio(cispo[rng.integers(0, len(cispo), len(cispo))],
                            dapo[rng.integers(0, len(dapo), len(dapo))])
                      for _ in range(samples)])
  draws = draws[~np.isnan(draws)]
  if not len(draws):
    return {"ratio": ratio(cispo, dapo), "low": float("nan"), "high": float("nan"),
            "never": float("nan")}
  low, high = np.percentile(draws, [2.5, 97.5], method="nearest")  # inf-safe
  return {"ratio": ratio(cispo, dapo), "low": float(low), "high": float(high),
          "never": float(np.mean(np.isinf(draws)))}


def grid_rows(curves) -> list[dict]:
  """One row per (arm, lr): seeds, start, final mean +- std, mean over the curve, best-lr mark,
  and the last-step training metrics (seed means)."""
  best = best_learning_rates(curves)
  rows = []
  for (arm, lr), c in sorted(curves.items()):
    mean = c["accuracy"].mean(0)
    row = {"arm": arm, "learning_rate": lr, "seeds": c["accuracy"].shape[0],
           "best_lr": lr == best[arm], "start": float(mean[0]), "final_mean": float(mean[-1]),
           "final_std": float(c["accuracy"][:, -1].std()), "curve_mean": float(mean.mean())}
    for name in GRID_METRICS:
      row[name] = float(c[name][:, -1].mean()) if name in c else float("nan")
    rows.append(row)
  return rows


def plot_grid(curves, path: str, title: str) -> None:
  """Left: held-out accuracy vs RL step of every arm at its best learning rate (mean +- std over
  seeds); right: approx KL, entropy and the clipped share per arm (seed means)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  best = best_learning_rates(curves)
  colors = {"cispo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green", "gspo": "tab:purple"}
  panels = [("accuracy", "held-out accuracy (greedy)"), ("approx_kl_k3", "approx KL (k3)"),
            ("entropy", "entropy"), ("clip_frac", "clipped / capped token share")]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
  for arm, lr in sorted(best.items()):
    c = curves[(arm, lr)]
    color = colors.get(GRID_ARMS[arm].kind if arm in GRID_ARMS else arm, "tab:gray")
    style = "-" if arm in colors else "--"
    label = f"{arm} (lr {lr:g}, {c['accuracy'].shape[0]} seeds)"
    for ax, (name, ylabel) in zip(axes[0], panels):
      if name == "accuracy":
        x, values = c["steps"], c["accuracy"]
      elif name == "clip_frac":
        if "clip_frac_low" not in c:
          continue
        x, values = c["train_steps"], c["clip_frac_low"] + c["clip_frac_high"]
      elif name in c:
        x, values = c["train_steps"], c[name]
      else:
        continue
      mean, std = values.mean(0), values.std(0)
      ax.plot(x, mean, label=label, color=color, linestyle=style)
      if name == "accuracy":
        ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=color)
      ax.set_xlabel("RL step")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
