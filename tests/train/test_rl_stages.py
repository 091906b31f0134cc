"""Staged length-window expansion (rl.stages): the schedule's count and rule transitions, the
settings each stage's steps use, one compilation per stage, the config checks, resume across a
boundary (Ctrl-C-free crashes in-process and kill -9 of a real run), and the plots."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from m1jax import generate
from m1jax.train import driver, metrics as metrics_lib, rl as rl_trainer, rl_stages, schema
from m1jax.train import stage as stage_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "tests/train/staged_config.py"


def _config():
  spec = importlib.util.spec_from_file_location("staged_config", os.path.join(ROOT, CONFIG))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _records(workdir):
  """rl/metrics.jsonl without the wall-clock entries (time_s and the time/* phase timings)."""
  with open(os.path.join(workdir, "rl", "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items()
             if k != "time_s" and not k.startswith("time/")} for line in f]


# --- the schedule ----------------------------------------------------------------------------------
def _schedule(*stages, steps=20):
  rl = schema.base_config().rl
  rl.steps = steps
  rl.stages = stages
  return rl_stages.StageSchedule(rl)


def _run(schedule, values, metric="truncated_length"):
  """Feeds one metric value per step; returns the stage index each step ran in."""
  ran = []
  for step, value in enumerate(values):
    ran.append(schedule.index)
    schedule.end_step(step + 1, {metric: value})
  return ran


def test_count_based_stages_last_their_steps():
  schedule = _schedule(schema.rl_stage(max_new_tokens=8, steps=2),
                       schema.rl_stage(max_new_tokens=16, steps=3),
                       schema.rl_stage(max_new_tokens=32))
  assert _run(schedule, [1.0] * 8) == [0, 0, 1, 1, 1, 2, 2, 2]
  assert schedule.start == 5 and schedule.config.max_new_tokens == 32


def test_rule_moves_on_when_the_window_mean_crosses_the_threshold():
  below = dict(metric="truncated_length", below=0.3, window=3)
  schedule = _schedule(schema.rl_stage(max_new_tokens=8, advance_when=below),
                       schema.rl_stage(max_new_tokens=16))
  # Means over the last 3 steps: 0.5, 0.333.., 0.2 < 0.3 after the 5th step.
  assert _run(schedule, [0.9, 0.4, 0.2, 0.4, 0.0, 0.9]) == [0, 0, 0, 0, 0, 1]
  # min_steps holds the rule back; the values before the stage began do not count.
  schedule = _schedule(schema.rl_stage(max_new_tokens=8, steps=1),
                       schema.rl_stage(max_new_tokens=16, advance_when=dict(
                           metric="reward", above=0.5, window=2, min_steps=4)),
                       schema.rl_stage(max_new_tokens=32))
  assert _run(schedule, [0.9, 0.9, 0.9, 0.9, 0.9, 0.0], metric="reward") == [0, 1, 1, 1, 1, 2]
  # With both, the step count caps a rule that never fires.
  schedule = _schedule(schema.rl_stage(max_new_tokens=8, steps=4, advance_when=below),
                       schema.rl_stage(max_new_tokens=16))
  assert _run(schedule, [1.0] * 6) == [0, 0, 0, 0, 1, 1]


def test_schedule_state_resumes_mid_window():
  """A schedule restored mid-stage (JSON, as in a checkpoint) takes the same decisions as one that
  ran through: the rule's recent values are part of the state."""
  stages = (schema.rl_stage(max_new_tokens=8, steps=1),
            schema.rl_stage(max_new_tokens=16, advance_when=dict(below=0.5, window=3)),
            schema.rl_stage(max_new_tokens=32))
  values = [1.0, 0.1, 0.1, 0.9, 0.9, 0.9]  # stage 1 has means 0.367 (< 0.5) after step 4
  straight = _run(_schedule(*stages), values)
  first = _schedule(*stages)
  _run(first, values[:3])
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"index": 1, "start": 1, "history": [0.1, 0.1]}
  resumed = _schedule(*stages)
  resumed.set_state(state)
  ran = [resumed.index]
  for step in range(3, len(values)):
    ran.append(resumed.index)
    resumed.end_step(step + 1, {"truncated_length": values[step]})
  assert straight == [0, 1, 1, 1, 2, 2] and straight[3:] == ran[1:4]
  # Without the kept values, the first mean would be 0.9 and the stage would not end.
  forgetful = _schedule(*stages)
  forgetful.set_state({**state, "history": []})
  assert forgetful.end_step(4, {"truncated_length": 0.9}) is None
  with pytest.raises(ValueError, match="checkpoint is in stage 3 of rl.stages; the config has 3"):
    resumed.set_state({"index": 3, "start": 0, "history": []})


def test_settings_accumulate_from_stage_to_stage():
  rl = schema.base_config().rl
  rl.stages = (schema.rl_stage(max_new_tokens=8, steps=2, loss=dict(clip_eps_high=0.3)),
               {"max_new_tokens": 16, "optimizer": {"learning_rate": 1e-5}})
  first, second = schema.stage_rl_configs(rl)
  assert (first.max_new_tokens, first.loss.clip_eps_high, first.optimizer.learning_rate) == (
      8, 0.3, 1e-3)
  assert (second.max_new_tokens, second.loss.clip_eps_high, second.optimizer.learning_rate) == (
      16, 0.3, 1e-5)
  assert second.stages == () and rl.max_new_tokens == 32  # rl itself is unchanged
  rl.stages = ()
  (only,) = schema.stage_rl_configs(rl)
  assert only.to_dict() == rl.to_dict()


# --- config checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda s: s[1].update(max_new_tokens=0), "config.rl.stages[1].max_new_tokens=0: must be >= 1"),
    (lambda s: s[0].loss.update(clip_eps_low=-0.1),
     "config.rl.stages[0].loss: LossConfig.clip_eps_low must be >= 0"),
    (lambda s: s[1].optimizer.update(learning_rate=0.0),
     "config.rl.stages[1].optimizer.learning_rate=0.0: must be positive"),
    (lambda s: s[1].update(steps=3), "config.rl.stages[1]: the last stage runs until rl.steps"),
    (lambda s: s[0].update(steps=0), "config.rl.stages[0]: needs an end"),
    (lambda s: s[0].update(steps=100), "config.rl.stages[1]: starts at step 100 at the earliest"),
    (lambda s: s[0].advance_when.update(above=0.5, below=0.1),
     "config.rl.stages[0].advance_when: set one of below=0.1 and above=0.5"),
    (lambda s: s[0].advance_when.update(below=0.1, metric="loss"),
     "config.rl.stages[0].advance_when.metric='loss': must be one of"),
    (lambda s: s[0].advance_when.update(below=0.1, window=0),
     "config.rl.stages[0].advance_when.window=0: must be >= 1"),
])
def test_bad_stages_name_the_index_and_key(change, message):
  config = schema.base_config()
  config.rl.stages = (schema.rl_stage(max_new_tokens=8, steps=3),
                      schema.rl_stage(max_new_tokens=16))
  schema.validate(config)
  change(config.rl.stages)
  with pytest.raises(ValueError) as error:
    schema.validate(config)
  assert str(error.value).startswith(message)


def test_bad_stage_entries_name_the_index_and_key():
  config = schema.base_config()
  config.rl.stages = ({"max_new_tokens": 8, "steps": 3}, {"max_new_tokenz": 16})
  with pytest.raises(ValueError, match=r"config.rl.stages\[1\].max_new_tokenz: unknown key"):
    schema.validate(config)
  config.rl.stages = ({"max_new_tokens": "8", "steps": 3}, {})
  with pytest.raises(ValueError, match=r"config.rl.stages\[0\].max_new_tokens='8': expected int"):
    schema.validate(config)
  config.rl.stages = ({"loss": 3, "steps": 3}, {})
  with pytest.raises(ValueError, match=r"config.rl.stages\[0\].loss=3: expected a group of keys"):
    schema.validate(config)
  with pytest.raises(ValueError, match=r"rl_stage.optimizer.lr: unknown key"):
    schema.rl_stage(optimizer=dict(lr=1e-4))


@pytest.mark.parametrize("override, line", [
    ("--config.rl.stages[1].max_new_tokens=0", "config.rl.stages[1].max_new_tokens=0: must be >= 1"),
    ("--config.rl.stages[1].max_new_tokenz=3", "config.rl.stages[1].max_new_tokenz: unknown key; "
     "did you mean config.rl.stages[1].max_new_tokens?"),
    ("--config.rl.stages[2].steps=3", "config.rl.stages has 2 entries: no entry [2]"),
    ("--config.rl.stages=({'max_new_tokens': 8, 'steps': 2}, {'max_new_tokens': 'x'})",
     "config.rl.stages[1].max_new_tokens='x': expected int"),
])
def test_stages_from_the_command_line(override, line, tmp_path):
  result = subprocess.run([sys.executable, "-m", "experiments.train",
                           "--config=configs/rl/staged_demo.py", f"--workdir={tmp_path}", override],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode != 0
  assert line in result.stderr.strip().splitlines()[-1]
  assert not os.listdir(tmp_path)


def test_a_stage_setting_from_the_command_line_is_used():
  flags_ = [f"--config={CONFIG}", "--config.rl.stages[1].loss.is_ratio_cap=3.5",
            "--config.rl.stages[2].optimizer.grad_clip=0.0"]
  # The flag parser of experiments/train.py, without running it.
  script = ("import sys; from absl import flags; from experiments import train; "
            "train._parse_flags(['train'] + sys.argv[1:] + ['--workdir=/unused']); "
            "from m1jax.train import schema; c = flags.FLAGS.config; schema.validate(c); "
            "print([(s.loss.is_ratio_cap, s.optimizer.grad_clip) "
            "for s in schema.stage_rl_configs(c.rl)])")
  result = subprocess.run([sys.executable, "-c", script, *flags_], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[(5.0, 1.0), (3.5, 1.0), (3.5, 0.0)]"


def test_shipped_staged_demo_has_two_stages():
  spec = importlib.util.spec_from_file_location(
      "staged_demo", os.path.join(ROOT, "configs/rl/staged_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  schema.validate(config)
  windows = [c.max_new_tokens for c in schema.stage_rl_configs(config.rl)]
  assert windows == [16, 32]
  assert "2 stages (max_new_tokens 16 -> 32)" in metrics_lib.plot_title(config, "rl")


# --- a staged run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
  """The staged micro run, straight through, with what each trace of the update step and each
  sampler call received."""
  workdir = tmp_path_factory.mktemp("staged") / "straight"
  traces, windows = [], []
  original_update, original_generate = rl_trainer.rl_update, generate.generate

  def traced_update(cfg, loss_cfg, temperature, optimizer, state, batch, *args, **kwargs):
    traces.append((loss_cfg.is_ratio_cap, temperature, batch.old_logprobs.shape[1]))
    return original_update(cfg, loss_cfg, temperature, optimizer, state, batch, *args, **kwargs)

  def recorded_generate(cfg, params, prompts, config=None, **kwargs):
    if config.sampling.temperature > 0:  # the sampler's calls (held-out evaluation is greedy)
      windows.append(config.max_new_tokens)
    return original_generate(cfg, params, prompts, config, **kwargs)

  with pytest.MonkeyPatch.context() as m:
    m.setattr(rl_trainer, "rl_update", traced_update)
    m.setattr(generate, "generate", recorded_generate)
    driver.run_from_config(_config(), str(workdir))
  return workdir, traces, windows


def test_each_stage_runs_with_its_settings_compiled_once(staged_run):
  workdir, traces, windows = staged_run
  steps = [r for r in _records(workdir) if r["step"] > 0]
  stage = [int(r["stage"]) for r in steps]
  truncated = [r["truncated_length"] for r in steps]
  # Stage 0: 2 steps; stage 1 ends when the mean truncated share of its last 2 steps is > 0.5,
  # after 3 steps at the latest; stage 2 runs to the end.
  end_1 = next((k for k in (4, 5) if np.mean(truncated[k - 2:k]) > 0.5), 5)
  assert stage == [0, 0] + [1] * (end_1 - 2) + [2] * (6 - end_1)
  assert [int(r["stage_step"]) for r in steps] == (
      [1, 2] + list(range(1, end_1 - 1)) + list(range(1, 7 - end_1)))
  window = {0: 8, 1: 10, 2: 12}
  assert [r["max_new_tokens"] for r in steps] == [window[s] for s in stage]
  assert windows == [window[s] for s in stage]  # what the sampler generated with
  assert all(r["response_length"] <= window[s] for r, s in zip(steps, stage))
  # One trace (compilation) of the update step per stage, each with its loss and window.
  assert traces == [(5.0, 1.0, 8), (2.0, 1.0, 10), (2.0, 1.0, 12)]
  # The optimizer's learning rate and clipping norm as its updates used them (2 per step). The
  # one-step warmup (rate 0 at the first update) happens once: the optimizer state carries over.
  lr = [r["learning_rate"] for r in steps]
  np.testing.assert_allclose(lr, [1e-3, 2e-3] + [2e-3] * (end_1 - 2) + [5e-4] * (6 - end_1),
                             rtol=1e-6)  # float32 products
  assert [r["grad_clip"] for r in steps] == [1.0] * end_1 + [0.25] * (6 - end_1)
  assert metrics_lib.stage_starts(_records(workdir)) == [(0, 0), (1, 2), (2, end_1)]


def test_final_params_of_a_staged_run_load(staged_run):
  """driver.stage_params restores a staged run's checkpoint (its optimizer state holds the
  injected hyperparameters)."""
  cfg, params = driver.stage_params(str(staged_run[0] / "rl"))
  assert cfg.num_hidden_layers == 2 and "lm_head" in params


def test_plots_mark_the_stage_boundaries(staged_run):
  workdir, _, _ = staged_run
  records = _records(workdir)
  starts = metrics_lib.stage_starts(records)
  panels = rl_trainer.PANELS + rl_trainer.STAGE_PANELS
  fig = metrics_lib.figure(records, panels)
  for ax in fig.axes[:len(panels)]:  # twin axes share the marks of their panel
    marks = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()
             if line.get_label().startswith("_stage")}
    assert marks == {"_stage 1": starts[1][1], "_stage 2": starts[2][1]}
  assert os.path.getsize(workdir / "rl" / "metrics.png") > 1000
  # The staged panels plot the window and the settings used.
  labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
  assert {"max_new_tokens", "learning_rate", "truncated_length"} <= labels


def test_resume_after_crashes_across_boundaries_matches_straight_run(staged_run, tmp_path,
                                                                    monkeypatch):
  """Killed (no checkpoint on the way out, as with kill -9) after step 4 and again after step 5:
  each resume starts from the last periodic checkpoint (step 3, inside stage 1) and the result
  equals the straight run."""
  straight = _records(staged_run[0])
  original_log = stage_lib.Stage.log
  crash_at = []

  class Killed(Exception):
    pass

  def log_then_die(self, step, metrics, postfix=()):
    original_log(self, step, metrics, postfix)
    if crash_at and step == crash_at[0]:
      self.checkpointer.wait()  # a periodic checkpoint in flight finishes first
      raise Killed

  monkeypatch.setattr(stage_lib.Stage, "log", log_then_die)
  for crash in (4, 5):
    crash_at[:] = [crash]
    with pytest.raises(Killed):
      driver.run_from_config(_config(), str(tmp_path))
    assert max(r["step"] for r in _records(tmp_path)) == crash
    assert max(map(int, os.listdir(tmp_path / "rl" / "checkpoints"))) == 3
  crash_at[:] = []
  driver.run_from_config(_config(), str(tmp_path))
  assert _records(tmp_path) == straight


def test_kill_9_and_resume_across_a_boundary(staged_run, tmp_path):
  """A real run killed with SIGKILL once stage 1 has begun (its first step done), then resumed
  with the same command: metrics.jsonl equals the straight run's."""
  straight = _records(staged_run[0])
  command = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
             f"--workdir={tmp_path}"]
  metrics_path = tmp_path / "rl" / "metrics.jsonl"
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_path.exists() and any(json.loads(line)["step"] >= 3
                                     for line in metrics_path.read_text().splitlines()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(json.loads(line)["step"] for line in metrics_path.read_text().splitlines())
  assert killed_at < 6
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _records(tmp_path) == straight
