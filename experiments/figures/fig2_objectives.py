r"""Fig. 2 at small scale: CISPO vs DAPO vs GRPO vs GSPO from one SFT start, several seeds, with 16
off-policy updates per generation batch (the paper's regime) and with 1.

  python -m experiments.figures.fig2_objectives --out_dir=results/fig2

CPU-sized defaults (the arithmetic task and model of configs/sft/arithmetic.py, 40 RL steps,
3 seeds, 4 objectives plus CISPO with cap 1.28, 16 and 1 updates per batch, 2 worker processes):
about 85 minutes on 2 cores; rerunning skips finished runs. On a GPU, a larger run:
--config=configs/rl/fig2_small_gpu.py --workers=1.
"""

import os

from absl import app, flags

from experiments import reporting
from m1jax.analysis import objectives

_CONFIG = flags.DEFINE_string("config", "configs/sft/arithmetic.py", "Config of the SFT start "
                              "and the RL runs (model, task, batch sizes).")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/fig2", "Runs, table, CSV and PNG.")
_KINDS = flags.DEFINE_list("kinds", ["cispo", "dapo", "grpo", "gspo"], "RL objectives.")
_UPDATES = flags.DEFINE_list("updates", ["16", "1"], "Minibatch updates per generation batch.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "RL seeds (prompt order and sampling).")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 40, "RL steps per run (same budget for all).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 5, "Held-out evaluation interval.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Runs trained at once.")
_CISPO_CAPS = flags.DEFINE_list("extra_cispo_caps", ["1.28"], "Further CISPO runs with these "
                                "absolute IS-weight caps (the config's cap is 5).")


def main(argv):
  del argv
  out = _OUT_DIR.value
  sft_workdir = os.path.join(out, "sft")
  if not os.path.exists(os.path.join(sft_workdir, "summary.json")):
    error = objectives.train_run(_CONFIG.value, {"mode": "sft", "progress": False}, sft_workdir)
    if error:
      raise RuntimeError(f"the SFT start failed ({error}); see {sft_workdir}/stdout.log")
  overrides = {"rl.steps": _RL_STEPS.value, "rl.eval_every": _EVAL_EVERY.value}
  runs = objectives.run_grid(_CONFIG.value, os.path.join(sft_workdir, "sft"), out, _KINDS.value,
                             [int(u) for u in _UPDATES.value], [int(s) for s in _SEEDS.value],
                             overrides, workers=_WORKERS.value,
                             extra_cispo_caps=[float(c) for c in _CISPO_CAPS.value])
  curves = objectives.collect(out, runs)
  rows = objectives.summary_rows(curves)
  reporting.write_csv(os.path.join(out, "fig2_summary.csv"), list(rows[0]),
                      [list(r.values()) for r in rows])
  reporting.write_csv(
      os.path.join(out, "fig2_curves.csv"),
      ["kind", "updates_per_batch", "seed_index", "step", "eval_accuracy"],
      [[kind, mu, i, int(s), float(a)] for (kind, mu), c in sorted(curves.items())
       for i, accuracy in enumerate(c["accuracy"]) for s, a in zip(c["steps"], accuracy)])
  table = reporting.markdown_table(
      ["objective", "updates/batch", "seeds", "start", "final (mean +- std)", "best mean",
       "steps to reach DAPO's final", "ratio to DAPO"],
      [[r["kind"], r["updates_per_batch"], r["seeds"], f"{r['start']:.3f}",
        f"{r['final_mean']:.3f} +- {r['final_std']:.3f}", f"{r['best_mean']:.3f}",
        f"{r['steps_to_threshold']:.1f}", f"{r['ratio_to_reference']:.2f}"] for r in rows])
  with open(os.path.join(out, "fig2_table.md"), "w") as f:
    f.write(table + "\n")
  objectives.plot(curves, os.path.join(out, "fig2_objectives.png"),
                  f"held-out accuracy vs RL step, mean +- std over seeds ({_CONFIG.value})")
  print(table)


if __name__ == "__main__":
  app.run(main)
