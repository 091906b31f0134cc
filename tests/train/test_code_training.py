"""The code task in the training loop: its config block, the fail-closed start, and RL steps whose
rewards come from programs run in the sandbox."""

import json
import os

import pytest

from m1jax.rl.rewards import code
from m1jax.train import context, driver, schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _micro(**changes):
  code_task = {"task.name": "code", "task.eval_size": 4, "rl.max_prompt_len": 40,
               "code.time_limit_s": 1.0}
  return schema.load_config(os.path.join(ROOT, "tests/train/micro_config.py"),
                            {**code_task, **changes})


@pytest.mark.parametrize("change, message", [
    ({"code.workers": 0}, "config.code.workers=0: must be positive"),
    ({"code.time_limit_s": 0.0}, "config.code.time_limit_s=0.0: must be positive"),
    ({"code.startup_grace_s": -1.0}, "config.code.startup_grace_s=-1.0: must be >= 0"),
    ({"code.bwrap": ""}, "config.code.bwrap='': must name the bubblewrap executable"),
    ({"task.name": "code_jsonl"}, "config.task.jsonl_path='': required for task.name=code_jsonl"),
])
def test_bad_code_settings_fail_naming_the_key(change, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    schema.validate(_micro(**change))


def test_a_code_run_without_its_sandbox_stops_at_start(tmp_path):
  config = _micro(**{"code.bwrap": str(tmp_path / "missing-bwrap")})
  schema.validate(config)
  with pytest.raises(code.SandboxUnavailable, match="unsafe_no_sandbox"):
    context.build_context(config, str(tmp_path))
  config.task.name = "arithmetic"  # no code anywhere: no sandbox needed
  context.build_context(config, str(tmp_path))


def test_code_jsonl_problems_are_the_run_s_data(tmp_path):
  path = tmp_path / "problems.jsonl"
  rows = [{"prompt": f"add {i}\n", "entry_point": "g", "tests": [{"args": [1], "expected": 1 + i}],
           "solution": f"def g(x):\n  return x+{i}"} for i in range(40)]
  path.write_text("\n".join(json.dumps(r) for r in rows))
  ctx = context.build_context(_micro(**{"task.name": "code_jsonl", "task.jsonl_path": str(path)}),
                              str(tmp_path))
  train = list(context.source(ctx, "train"))
  assert train and all(e.task == "code" and e.metadata["entry_point"] == "g" for e in train)
  assert ctx.reward_fn.batch([e.demonstration for e in train], train).tolist() == [1.0] * len(train)


def test_rl_steps_score_sampled_programs_in_the_sandbox(tmp_path, monkeypatch):
  ran = []
  original = code.CodeReward.run

  def counting_run(self, texts, examples):
    ran.append(len(texts))
    return original(self, texts, examples)

  monkeypatch.setattr(code.CodeReward, "run", counting_run)
  config = _micro(**{"rl.steps": 2, "rl.eval_every": 2, "code.workers": 2})
  summary = driver.run_from_config(config, str(tmp_path))
  assert summary["rl"]["last_step"] == 2
  rows = config.rl.prompts_per_step * config.rl.samples_per_prompt
  # Each step's batch goes to the sandbox once (the correctness reuses it); plus the held-out
  # evaluations at steps 0 and 2 (4 prompts each).
  assert sorted(ran) == sorted([rows, rows, 4, 4]), ran
  with open(tmp_path / "rl" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert all(r["time/score"] > 0 for r in records if "reward" in r)
