"""The resumable Fig. 2 grid (m1jax.analysis.objectives): the launcher's deadline and failures,
arms that wait for their objective's best learning rate, the CISPO / DAPO bootstrap, every arm's
overrides against the config schema, and the summary's rows and figure."""

import json
import sys
import time

import numpy as np
import pytest

from m1jax.analysis import objectives
from m1jax.train import schema

MICRO_CONFIG = "tests/train/micro_config.py"


def test_run_jobs_interrupts_at_the_deadline_and_reports_unfinished(tmp_path):
  jobs = [("a", (60,), str(tmp_path)), ("b", (60,), str(tmp_path))]
  start = time.time()
  unfinished = objectives.run_jobs(jobs, workers=1, deadline=start + 3, log=lambda _: None,
                                   target=time.sleep, grace_s=10)
  assert unfinished == ["a", "b"]  # "a" interrupted, "b" never started
  assert time.time() - start < 30


def test_run_jobs_finishes_jobs_and_raises_on_a_failed_one(tmp_path):
  logged = []
  assert objectives.run_jobs([("a", (0,), str(tmp_path)), ("b", (0,), str(tmp_path))],
                             workers=2, log=logged.append, target=time.sleep) == []
  assert sorted(line for line in logged if "done" in line) == ["a: done", "b: done"]
  with pytest.raises(RuntimeError, match=r"\['bad'\] failed"):
    objectives.run_jobs([("bad", (3,), str(tmp_path))], log=lambda _: None, target=sys.exit)


def _write_run(out_dir, run, accuracy, kl=0.01):
  path = out_dir / "runs" / run.name
  (path / "rl").mkdir(parents=True)
  records = []
  for step, value in enumerate(accuracy):
    records.append({"step": step, "eval/accuracy": value})
    records.append({"step": step + 1, "approx_kl_k3": kl, "entropy": 1.0, "clip_frac_low": 0.1,
                    "clip_frac_high": 0.2, "trust_region_masked_frac": 0.0,
                    "is_weight_max": 3.0})
  (path / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (path / "summary.json").write_text("{}")


def test_arms_wait_for_their_objective_then_take_its_best_learning_rate(tmp_path):
  arms, lrs, seeds = ["cispo", "cispo_lag2"], [1e-5, 3e-5], [0, 1]
  runs, waiting = objectives.grid_runs(str(tmp_path), arms, lrs, seeds)
  assert [r.arm for r in runs] == ["cispo"] * 4 and waiting == ["cispo_lag2"]
  for run in runs:
    better = run.learning_rate == 3e-5
    _write_run(tmp_path, run, [0.2, 0.5 if better else 0.3, 0.6 if better else 0.4])
  runs, waiting = objectives.grid_runs(str(tmp_path), arms, lrs, seeds)
  assert waiting == []
  assert [(r.arm, r.learning_rate, r.seed) for r in runs[4:]] == [("cispo_lag2", 3e-5, 0),
                                                                 ("cispo_lag2", 3e-5, 1)]
  with pytest.raises(ValueError, match="unknown"):
    objectives.grid_runs(str(tmp_path), ["cispo", "ppo"], lrs, seeds)


@pytest.mark.parametrize("arm", sorted(objectives.GRID_ARMS))
def test_every_arm_gives_a_valid_config(arm):
  run = objectives.GridRun(arm, 1e-5, 1)
  config = schema.load_config(MICRO_CONFIG, objectives.grid_overrides(run, "/sft", {}))
  schema.validate(config)
  assert config.rl.loss.kind == objectives.GRID_ARMS[arm].kind
  assert config.rl.optimizer.learning_rate == 1e-5 and config.seed == 1
  for key, value in objectives.GRID_ARMS[arm].overrides:
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == value, key


def test_bootstrap_ratio():
  steps = np.arange(0, 11, dtype=float)
  dapo = np.tile(np.linspace(0.0, 1.0, 11), (3, 1))  # reaches its final 1.0 at step 10
  cispo = np.tile(np.minimum(np.linspace(0.0, 2.0, 11), 1.0), (3, 1))  # 1.0 at step 5
  r = objectives.bootstrap_ratio(steps, cispo, dapo, samples=50)
  assert r["ratio"] == pytest.approx(0.5) and r["low"] == r["high"] == pytest.approx(0.5)
  assert r["never"] == 0.0
  never = objectives.bootstrap_ratio(steps, cispo * 0.5, dapo, samples=50)
  assert never["ratio"] == np.inf and never["never"] == 1.0 and never["high"] == np.inf


def test_grid_summary_rows_and_figure(tmp_path):
  runs = [objectives.GridRun(arm, lr, seed) for arm in ("cispo", "dapo")
          for lr in (1e-5, 3e-5) for seed in (0, 1)]
  for run in runs:
    _write_run(tmp_path, run, [0.1, 0.3 + (run.learning_rate == 1e-5) * 0.1 + 0.01 * run.seed],
               kl=0.02 if run.arm == "cispo" else 0.01)
  curves = objectives.collect_grid(str(tmp_path), runs + [objectives.GridRun("gspo", 1e-5, 0)])
  assert sorted(curves) == [("cispo", 1e-5), ("cispo", 3e-5), ("dapo", 1e-5), ("dapo", 3e-5)]
  assert curves[("cispo", 1e-5)]["accuracy"].shape == (2, 2)
  rows = objectives.grid_rows(curves)
  assert [(r["arm"], r["learning_rate"]) for r in rows if r["best_lr"]] == [("cispo", 1e-5),
                                                                           ("dapo", 1e-5)]
  assert rows[0]["final_mean"] == pytest.approx(0.405)
  assert rows[0]["approx_kl_k3"] == pytest.approx(0.02)
  objectives.plot_grid(curves, str(tmp_path / "grid.png"), "t")
  assert (tmp_path / "grid.png").stat().st_size > 1000
