"""What a failed or odd run leaves behind: inputs checked before anything is written, config
changes in an existing workdir, errors and signals mid-run, non-finite stops, torn metrics."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from m1jax.train import context, driver, schema
from m1jax.train import stage as stage_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _micro(**changes):
  return schema.load_config(os.path.join(ROOT, "tests/train/micro_config.py"), changes)


def _records(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


CLI = [sys.executable, "-m", "experiments.train", "--config=tests/train/micro_config.py"]


def _run_cli(args, env=None, timeout=300, command=CLI):
  """(CompletedProcess, CPU seconds of the child): CPU time, not wall time, so that a loaded
  machine does not fail a fail-fast check."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = subprocess.run(command + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return result, cpu


@pytest.mark.parametrize("override, message", [
    ("--config.rl.init_from={tmp}/no_sft", "config.rl.init_from='{tmp}/no_sft': no checkpoint"),
    ("--config.task.name=jsonl --config.task.jsonl_path={tmp}/none.jsonl",
     "config.task.jsonl_path='{tmp}/none.jsonl': no such file"),
    ("--config.model.hf_dir={tmp}/no_hf", "config.model.hf_dir='{tmp}/no_hf': no such directory"),
    ("--config.rl.optimizer.learning_rate=inf",
     "config.rl.optimizer.learning_rate=inf: must be a finite number"),
])
def test_missing_paths_and_infinite_values_fail_fast_creating_nothing(tmp_path, override, message):
  workdir = tmp_path / "run"
  result, cpu = _run_cli([f"--workdir={workdir}", *override.format(tmp=tmp_path).split()])
  assert result.returncode == 2
  assert message.format(tmp=tmp_path) in result.stderr
  assert cpu < 5.0, f"{cpu:.1f} s of CPU"
  assert os.listdir(tmp_path) == []  # neither the workdir nor <init_from>/checkpoints


def test_a_batch_that_does_not_divide_over_the_mesh_is_named_before_anything_is_written(
    tmp_path):
  result, _ = _run_cli([f"--workdir={tmp_path / 'run'}", "--config.mode=sft",
                        "--config.sft.batch_size=8"],
                       env={"XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
  assert result.returncode == 1
  assert ("config.sft.batch_size=8: must divide over the 3 batch devices (data x fsdp x expert) "
          "of the mesh (data=1, fsdp=3, tensor=1, expert=1)") in result.stderr
  assert os.listdir(tmp_path) == []


def _long_prompt_jsonl(path):
  rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(30) for b in range(30)]
  rows[49::50] = [{"prompt": "What is " + "1+" * 20 + "1=", "answer": "21"}] * len(rows[49::50])
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_over_long_rows_are_named_before_step_1_or_dropped(tmp_path):
  data = _long_prompt_jsonl(tmp_path / "data.jsonl")
  config = _micro(**{"task.name": "jsonl", "task.jsonl_path": data})
  with pytest.raises(ValueError, match=r"18 of 900 examples are longer than this run allows, "
                     r"e.g. example 50 \('What is 1\+1.*prompt of 51 tokens > "
                     r"config.rl.max_prompt_len=16.*set config.task.drop_long=True"):
    driver.run_from_config(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  config.task.drop_long = True
  ctx = context.build_context(config, str(tmp_path / "run"))
  assert len(ctx.examples) == 900 - 18 and not os.path.exists(tmp_path / "run")


# The CLI with a patch applied first (a failure at a chosen moment).
PATCHED_CLI = [sys.executable, "-c", """
import os, signal, sys
from absl import app
from experiments import train
from m1jax.train import rl
calls = []
if os.environ["PATCH"] == "sigterm_in_step_1":
  sample = rl.Sampler.__call__
  def sigterm_then_sample(self, *args, **kwargs):
    if not calls:
      calls.append(1)
      os.kill(os.getpid(), signal.SIGTERM)
    return sample(self, *args, **kwargs)
  rl.Sampler.__call__ = sigterm_then_sample
else:  # an error in the 3rd step of this process
  advantages = rl.compute_advantages
  def fail_in_step_3(*args):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("error in the 3rd step")
    return advantages(*args)
  rl.compute_advantages = fail_in_step_3
app.run(train.main, flags_parser=train._parse_flags)
""", "--config=tests/train/micro_config.py"]


def test_sigterm_then_errors_mid_run_exit_cleanly_and_keep_the_checkpoints(tmp_path):
  args = [f"--workdir={tmp_path}", "--config.checkpoint.every_steps=1", "--config.rl.steps=8",
          "--config.rl.eval_every=0"]
  checkpoints = tmp_path / "rl" / "checkpoints"
  # SIGTERM inside the first step: one line, exit code 128 + 15.
  result, _ = _run_cli(args, env={"PATCH": "sigterm_in_step_1"}, command=PATCHED_CLI)
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "rl: interrupted in step 1; no checkpoint yet: a rerun starts this stage from the beginning")
  assert not os.listdir(checkpoints)
  # An error in step 3 (a checkpoint every step): the process exits, step 2's save is finished.
  result, _ = _run_cli(args, env={"PATCH": "error"}, command=PATCHED_CLI)
  assert result.returncode == 1 and "error in the 3rd step" in result.stderr
  assert sorted(os.listdir(checkpoints)) == ["1", "2"]
  # The rerun resumes from step 2, fails in its 3rd step (5) and exits too.
  result, _ = _run_cli(args, env={"PATCH": "error"}, command=PATCHED_CLI)
  assert result.returncode == 1 and "error in the 3rd step" in result.stderr
  assert sorted(os.listdir(checkpoints)) == ["3", "4"]
  assert [r["step"] for r in _records(tmp_path, "rl")] == [0, 1, 2, 3, 4]


def test_a_rerun_refuses_a_config_change_that_would_mix_runs_and_records_allowed_ones(
    tmp_path, monkeypatch):
  config = _micro(**{"mode": "sft", "sft.steps": 2, "checkpoint.every_steps": 1})
  driver.run_from_config(config, str(tmp_path))
  stored = (tmp_path / "config.json").read_bytes()
  files = sorted(os.listdir(tmp_path))
  changed = _micro(**{"mode": "sft", "sft.steps": 2, "checkpoint.every_steps": 1,
                      "model.hidden_size": 64, "sft.optimizer.learning_rate": 0.02})
  with pytest.raises(ValueError, match=r"config.model.hidden_size: 32 -> 64; "
                                       r"config.sft.optimizer.learning_rate: 0.01 -> 0.02\. "):
    driver.run_from_config(changed, str(tmp_path))
  assert (tmp_path / "config.json").read_bytes() == stored and sorted(os.listdir(tmp_path)) == files
  # More steps (constant schedule), another cadence and display, and a change to the RL stage,
  # which has not started: allowed and recorded. A torn last metrics line is repaired.
  with open(tmp_path / "sft" / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "nl')
  extended = _micro(**{"mode": "sft", "sft.steps": 3, "checkpoint.every_steps": 1,
                       "sft.log_every": 2, "progress": True, "rl.loss.kind": "grpo"})
  # config.json is replaced whole (the other processes of a run read it in check_rerun): until
  # the rename, it holds the stored config.
  real_replace, replaced = os.replace, {}

  def replace(src, dst):
    if os.path.basename(dst) in ("config.json", "summary.json"):
      replaced[os.path.basename(dst)] = open(dst, "rb").read()
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  driver.run_from_config(extended, str(tmp_path))
  monkeypatch.undo()
  assert replaced["config.json"] == stored and set(replaced) == {"config.json", "summary.json"}
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
  assert [r["step"] for r in _records(tmp_path, "sft")] == [0, 1, 2, 3]
  (record,) = [json.loads(line) for line in open(tmp_path / "config_changes.jsonl")]
  assert record["changes"] == {"progress": [False, True], "rl.loss.kind": ["cispo", "grpo"],
                               "sft.log_every": [1, 2], "sft.steps": [2, 3]}
  assert json.loads((tmp_path / "config.json").read_text())["sft"]["steps"] == 3


def test_rerun_rules_for_steps_and_mode():
  base = _micro()
  stored = json.loads(base.to_json_best_effort())
  fewer = _micro(**{"rl.steps": 3})
  assert schema.rerun_changes(stored, fewer, {"rl": 4})[1] == {"rl.steps": (6, 3)}
  assert schema.rerun_changes(stored, fewer, {"rl": 3})[0] == {"rl.steps": (6, 3)}
  cosine = _micro(**{"rl.steps": 9, "rl.optimizer.schedule": "cosine"})
  stored_cosine = json.loads(_micro(**{"rl.optimizer.schedule": "cosine"}).to_json_best_effort())
  assert "rl.steps" in schema.rerun_changes(stored_cosine, cosine, {"rl": 4})[1]
  to_sft_rl = _micro(**{"mode": "sft_rl"})
  assert schema.rerun_changes(stored, to_sft_rl, {"sft": 6})[1] == {}
  assert schema.rerun_changes(stored, to_sft_rl, {"rl": 2})[1] == {"mode": ("rl", "sft_rl")}
  # A key the stored config predates compares as its default.
  del stored["task"]["drop_long"]
  assert schema.rerun_changes(stored, base, {"rl": 2}) == ({}, {})
  assert schema.rerun_changes(stored, _micro(**{"task.drop_long": True}), {"rl": 2})[1] == {
      "task.drop_long": ("<absent>", True)}


def test_a_non_finite_stop_keeps_the_last_good_checkpoint_and_a_rerun_resumes_there(
    tmp_path, caplog):
  def config(lr):  # periodic checkpoints every 100 steps: the first one is step 1's
    return _micro(**{"mode": "sft", "sft.steps": 8, "sft.optimizer.learning_rate": lr,
                     "checkpoint.keep": 1})

  checkpoints = tmp_path / "sft" / "checkpoints"
  # Step 1 trains at the warmup's learning rate 0, step 2 at 1e6 (the params diverge), steps 3
  # and 4 are non-finite and skipped: the stop.
  with pytest.raises(stage_lib.NonFiniteError, match="A rerun with the same --workdir sets it "
                     "apart and resumes from step 1, the last checkpoint before them"):
    driver.run_from_config(config(1e6), str(tmp_path))
  # keep=1, yet step 1 (the last before the skipped steps) stays beside the stop's.
  assert sorted(os.listdir(checkpoints)) == ["1", "4"]
  assert json.loads((tmp_path / "sft" / stage_lib.NONFINITE_MARKER).read_text())["step"] == 4
  # The same config stops again; step 1 is still there; the stopped state is kept apart.
  with pytest.raises(stage_lib.NonFiniteError):
    driver.run_from_config(config(1e6), str(tmp_path))
  assert sorted(os.listdir(checkpoints)) == ["1", "4"]
  assert os.listdir(tmp_path / "sft" / "nonfinite") == ["4"]
  # A lower learning rate is accepted for the stopped stage; the run resumes from step 1. (The
  # micro config's own rate: the rerun test above compiled that SFT step already.)
  caplog.set_level("WARNING")
  driver.run_from_config(config(1e-2), str(tmp_path))
  assert ("sft: the previous run stopped on non-finite steps at step 4 (that state is kept apart "
          f"in {tmp_path}/sft/nonfinite/4); resuming from step 1, the last checkpoint before it"
          ) in caplog.text
  assert os.listdir(checkpoints) == ["8"]
  records = _records(tmp_path, "sft")
  assert [r["step"] for r in records] == list(range(9))
  assert all(r.get("skipped", 0) == 0 for r in records)
  (change,) = [json.loads(line) for line in open(tmp_path / "config_changes.jsonl")]
  assert change["changes"] == {"sft.optimizer.learning_rate": [1e6, 1e-2]}
