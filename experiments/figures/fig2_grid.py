r"""Fig. 2 as a resumable grid: arms x learning rates x seeds from one SFT start.

  python -m experiments.figures.fig2_grid --config=configs/rl/fig2_grid_gpu.py \
      --out_dir=results/fig2_grid --max_minutes=9          # repeat until it says "complete"
  # CPU smoke run (the test config, 2 arms, 1 seed):
  python -m experiments.figures.fig2_grid --config=tests/train/micro_config.py \
      --arms=cispo,dapo --learning_rates=1e-3 --seeds=0 --rl_steps=2 --out_dir=/tmp/fig2_grid

Arms (m1jax.analysis.objectives.GRID_ARMS): cispo, dapo, grpo, gspo at every --learning_rates
entry; cispo_trust_lower (CISPO with only the lower half of the trust region), cispo_lag2 and
dapo_lag2 (rollout lag 2) at the best learning rate of their objective, once its cells are done.
Every run trains in its own process (--workers at a time) under --out_dir/runs/<arm>_lr<lr>_seed<s>;
finished runs are skipped, and at --max_minutes the running ones are interrupted with a
checkpoint and resume on the next call (a SIGTERM to this process does the same), so the grid
accumulates over calls that each fit a time limit. Every call rewrites the summary from the runs
finished so far: fig2_grid.md (table per arm and learning rate, the best learning rate per arm,
CISPO / DAPO steps to DAPO's final accuracy with a bootstrap interval over seeds), fig2_grid.csv,
fig2_grid.png, and fig2_grid_time.json (the wall seconds of every call: the device time the grid
took).

Device time of the full default grid on one H200: not measured yet.
"""

import datetime
import json
import os
import time

from absl import app, flags

from experiments import reporting
from m1jax import files
from m1jax.analysis import objectives
from m1jax.train import metrics

_CONFIG = flags.DEFINE_string("config", "configs/rl/fig2_grid_gpu.py",
                              "Config of the SFT start and of every RL run.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/fig2_grid", "Runs, summary and time ledger.")
_ARMS = flags.DEFINE_list("arms", list(objectives.GRID_ARMS), "Arms (GRID_ARMS keys).")
_LEARNING_RATES = flags.DEFINE_list("learning_rates", ["3e-6", "1e-5", "3e-5"],
                                    "RL learning rates of the arms without lr_from.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "RL seeds (prompt order and sampling).")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 0, "RL steps per run (0: the config's rl.steps).")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0.0, "Stop (resumably) after this many minutes "
                                  "(0: run the whole grid).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Runs trained at once.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Resamples of the CISPO / DAPO ratio.")


def _ledger(out: str, start: float, finished: int, total: int) -> list[dict]:
  path = os.path.join(out, "fig2_grid_time.json")
  calls = json.load(open(path)) if os.path.exists(path) else []
  calls.append({"started": datetime.datetime.fromtimestamp(start).isoformat(timespec="seconds"),
                "seconds": round(time.time() - start, 1), "finished_runs": finished,
                "grid_runs": total})
  files.write_atomically(path, json.dumps(calls, indent=1))  # whole, even under the SIGTERM
  return calls


def _summary(out: str, runs, waiting, calls, log) -> None:
  curves = objectives.collect_grid(out, runs)
  if not curves:
    log("no finished runs yet: no summary")
    return
  rows = objectives.grid_rows(curves)
  reporting.write_csv(os.path.join(out, "fig2_grid.csv"), list(rows[0]),
                      [list(r.values()) for r in rows])
  table = reporting.markdown_table(
      ["arm", "lr", "seeds", "start", "final (mean +- std)", "curve mean", "approx KL",
       "entropy", "clip low", "clip high"],
      [[r["arm"] + (" **(best lr)**" if r["best_lr"] else ""), f"{r['learning_rate']:g}",
        r["seeds"], f"{r['start']:.3f}", f"{r['final_mean']:.3f} +- {r['final_std']:.3f}",
        f"{r['curve_mean']:.3f}", f"{r['approx_kl_k3']:.4f}", f"{r['entropy']:.3f}",
        f"{r['clip_frac_low']:.3f}", f"{r['clip_frac_high']:.3f}"] for r in rows])
  best = objectives.best_learning_rates(curves)
  lines = [table, ""]
  if "cispo" in best and "dapo" in best:
    cispo, dapo = curves[("cispo", best["cispo"])], curves[("dapo", best["dapo"])]
    if cispo["steps"].tolist() == dapo["steps"].tolist():
      r = objectives.bootstrap_ratio(cispo["steps"], cispo["accuracy"], dapo["accuracy"],
                                     samples=_BOOTSTRAP.value)
      if r["ratio"] != r["ratio"]:  # nan
        lines.append("CISPO / DAPO steps to DAPO's final accuracy: undefined (DAPO's mean "
                     "curve is at its final accuracy from the first evaluation on).")
      else:
        lines.append(f"CISPO / DAPO steps to DAPO's final accuracy (each at its best lr, "
                     f"{len(cispo['accuracy'])} and {len(dapo['accuracy'])} seeds): "
                     f"{r['ratio']:.2f}, 95% bootstrap interval [{r['low']:.2f}, "
                     f"{r['high']:.2f}] (CISPO never reached it in {r['never']:.0%} of "
                     f"resamples); the paper: about 0.5.")
  finished = sum(objectives.grid_finished(out, run) for run in runs)
  lines.append(f"{finished} of {len(runs)} named runs finished"
               + (f"; waiting for their objective's cells: {', '.join(waiting)}" if waiting
                  else "") + f"; {sum(c['seconds'] for c in calls):.0f} s over {len(calls)} "
               f"calls so far.")
  with open(os.path.join(out, "fig2_grid.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  objectives.plot_grid(curves, os.path.join(out, "fig2_grid.png"),
                       f"arms at their best learning rate ({_CONFIG.value})")
  log("\n".join(lines))


def main(argv):
  del argv
  start = time.time()
  deadline = start + 60 * _MAX_MINUTES.value if _MAX_MINUTES.value > 0 else None
  out = _OUT_DIR.value
  os.makedirs(out, exist_ok=True)
  log = reporting.tee(os.path.join(out, "fig2_grid.log"))
  learning_rates = [float(lr) for lr in _LEARNING_RATES.value]
  seeds = [int(s) for s in _SEEDS.value]
  objectives.grid_runs(out, _ARMS.value, learning_rates, seeds)  # unknown arms stop here
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "jax_cache"))

  sft_workdir = os.path.join(out, "sft")
  if not os.path.exists(os.path.join(sft_workdir, "summary.json")):
    objectives.run_jobs([objectives.train_job("sft", _CONFIG.value,
                                              {"mode": "sft", "progress": False}, sft_workdir)],
                        deadline=deadline, log=log)
  sft_done = os.path.exists(os.path.join(sft_workdir, "summary.json"))
  if sft_done:
    evals = [r["eval/accuracy"] for r in metrics.read_jsonl(
        os.path.join(sft_workdir, "sft", "metrics.jsonl")) if "eval/accuracy" in r]
    if evals:
      log(f"SFT start: held-out accuracy {evals[-1]:.3f}"
          + (" (above 0.9: little left for RL to separate the objectives)"
             if evals[-1] > 0.9 else ""))

  overrides = {"rl.steps": _RL_STEPS.value} if _RL_STEPS.value else {}
  runs, waiting, unfinished = [], [], []
  while sft_done:
    runs, waiting = objectives.grid_runs(out, _ARMS.value, learning_rates, seeds)
    jobs = [objectives.train_job(
                run.name, _CONFIG.value,
                objectives.grid_overrides(run, os.path.join(sft_workdir, "sft"), overrides),
                os.path.join(out, "runs", run.name))
            for run in runs if not objectives.grid_finished(out, run)]
    if not jobs:
      break
    log(f"{len(runs) - len(jobs)} of {len(runs)} runs finished earlier; {len(jobs)} to train")
    unfinished = objectives.run_jobs(jobs, _WORKERS.value, deadline=deadline, log=log)
    if unfinished:
      break
  finished = sum(objectives.grid_finished(out, run) for run in runs)
  calls = _ledger(out, start, finished, len(runs))
  _summary(out, runs, waiting, calls, log)
  complete = sft_done and not unfinished and not waiting and finished == len(runs)
  log("grid complete" if complete else "grid not complete: run the same command again")


if __name__ == "__main__":
  app.run(main)
