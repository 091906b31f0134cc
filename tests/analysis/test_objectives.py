"""The objective-comparison curves (Fig. 2 at small scale) of staged runs: collect keeps where the
stages began and the plot marks them."""

import json

from m1jax.analysis import objectives
from m1jax.train import metrics


def _write_run(out_dir, run, boundary):
  path = out_dir / "runs" / run.name / "rl"
  path.mkdir(parents=True)
  records = [{"step": 0, "eval/accuracy": 0.1}]
  for step in range(1, 7):
    stage = int(step > boundary)
    records.append({"step": step, "stage": stage,
                    "stage_step": step - (boundary if stage else 0),
                    **({"eval/accuracy": 0.1 * step} if step % 3 == 0 else {})})
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_staged_runs_keep_and_mark_their_boundaries(tmp_path, monkeypatch):
  runs = [objectives.Run("cispo", 1, 0), objectives.Run("cispo", 1, 1)]
  _write_run(tmp_path, runs[0], boundary=2)
  _write_run(tmp_path, runs[1], boundary=4)  # a rule moved this seed on later
  curves = objectives.collect(str(tmp_path), runs)
  curve = curves[("cispo", 1)]
  assert curve["steps"].tolist() == [0, 3, 6]
  assert curve["stage_starts"] == [(0, 0), (1, 2), (1, 4)]
  marked = []
  monkeypatch.setattr(metrics, "mark_stages",
                      lambda ax, starts: marked.append(list(starts)))
  objectives.plot(curves, str(tmp_path / "fig.png"), "t")
  assert marked == [[(0, 0), (1, 2), (1, 4)]]
  assert (tmp_path / "fig.png").stat().st_size > 1000
