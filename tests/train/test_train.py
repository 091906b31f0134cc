"""The training driver: config checks, SFT and RL loops, resume, non-finite handling (across
devices and processes: test_train_distributed.py)."""

import importlib.util
import json
import os
import resource
import subprocess
import sys

import jax
import numpy as np
import pytest

from m1jax import model
from m1jax.rl import rewards
from m1jax.train import context, driver, optimizer as optimizer_lib, rl as rl_trainer, schema
from m1jax.train import stage as stage_lib
from m1jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _micro(**changes):
  return schema.load_config(os.path.join(ROOT, "tests/train/micro_config.py"), changes)


def _digit_share(text, example):
  """A dense test reward: the share of digits in the response, so random models get signal."""
  del example
  return sum(ch.isdigit() for ch in text) / max(len(text), 1)


rewards.register_reward("test_digit_share", _digit_share)


def _records(workdir, stage):
  """metrics.jsonl without the wall-clock entries (time_s and the time/* phase timings)."""
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items()
             if k != "time_s" and not k.startswith("time/")} for line in f]


@pytest.mark.parametrize("override, message", [
    (["--config.rl.stepz=3"], "stepz"),
    (["--config.rl.steps=abc"], "invalid literal for int"),
    (["--config.rl.loss.kind=ppo2"], "kind='ppo2'"),
    (["--config.rl.samples_per_prompt=1"], "samples_per_prompt=1"),
    (["--config.model.num_key_value_heads=3"], "num_key_value_heads=3"),
    (["--config.rl.loss.is_ratio_cap=0.5"], "is_ratio_cap"),
])
def test_bad_configs_fail_fast_naming_the_key(override, message, tmp_path):
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/demo.py",
                           f"--workdir={tmp_path}", *override], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  # The child's CPU time, not wall time: a loaded machine does not fail the check.
  elapsed = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
  assert result.returncode != 0
  assert message in result.stdout + result.stderr
  assert elapsed < 5.0, f"took {elapsed:.1f} s of CPU"  # the limit
  assert not os.listdir(tmp_path)  # nothing was started


@pytest.mark.parametrize("override, line", [
    ("--config.rl.step=5", "config.rl.step: unknown key; did you mean config.rl.steps?"),
    ("--config.rll.steps=5", "config.rll: unknown key; did you mean config.rl?"),
])
def test_misspelled_override_is_one_line_with_the_suggestion(override, line, tmp_path):
  result = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/demo.py",
                           f"--workdir={tmp_path}", override], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2
  assert result.stderr.strip() == line
  assert not os.listdir(tmp_path)


def test_unknown_key_names_the_full_path():
  config = schema.base_config()
  assert schema.unknown_key(config, "rl.loss.kind") is None
  assert schema.unknown_key(config, "rl.loss.kindd") == (
      "config.rl.loss.kindd: unknown key; did you mean config.rl.loss.kind?")
  assert schema.unknown_key(config, "rl.steps.x").startswith("config.rl.steps=100 is a value")
  assert "known keys here: ['checkpoint'," in schema.unknown_key(config, "zzzz")


def test_base_and_shipped_configs_validate():
  for name in ("configs/demo.py",) + tuple(
      os.path.join("configs", d, f) for d in ("rl", "sft")
      for f in sorted(os.listdir(os.path.join(ROOT, "configs", d)))
      if f.endswith(".py") and not f.startswith("_")):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    schema.validate(config)
    assert "python -m experiments.train --config=" + name in module.__doc__, name


def test_sft_learns_and_writes_outputs(tmp_path, capsys):
  config = _micro(**{"mode": "sft", "sft.steps": 12, "sft.eval_every": 6})
  summary = driver.run_from_config(config, str(tmp_path))
  records = _records(tmp_path, "sft")
  assert [r["step"] for r in records] == list(range(13))
  losses_ = [r["nll"] for r in records if "nll" in r]
  assert losses_[-1] < 0.7 * losses_[0]  # 12 steps on demonstrations: the NLL falls clearly
  assert "eval/accuracy@end" in summary["sft"]
  for name in ("metrics.png", "tensorboard", "checkpoints"):
    assert os.path.exists(tmp_path / "sft" / name)
  assert "held-out reward" in driver.format_summary(summary)
  assert not summary["complete_before_run"]
  # Every evaluation is printed as it happens.
  printed = [line for line in capsys.readouterr().out.splitlines() if "held-out accuracy" in line]
  assert [line.split(":")[0] for line in printed] == ["sft step 0/12", "sft step 6/12",
                                                      "sft step 12/12"]
  # A rerun has nothing to do and says so, with the results.
  again = driver.run_from_config(config, str(tmp_path))
  text = driver.format_summary(again)
  assert again["complete_before_run"] and text.startswith("Nothing to do: the run in")
  assert f"{tmp_path}/sft/metrics.png" in text
  assert "held-out accuracy" not in capsys.readouterr().out  # nothing was evaluated again


def test_rl_resume_after_interrupt_matches_straight_run(tmp_path, monkeypatch):
  config = _micro(**{"reward.task": 0.0})
  config.reward.test_digit_share = 1.0
  driver.run_from_config(config, str(tmp_path / "straight"))
  straight = _records(tmp_path / "straight", "rl")
  assert len({r["reward"] for r in straight if "reward" in r}) > 1  # a non-trivial run
  assert any(r["grad_norm"] > 0 for r in straight if "grad_norm" in r)

  original_log = stage_lib.Stage.log

  def log_then_interrupt(self, step, metrics, postfix=()):
    original_log(self, step, metrics, postfix)
    if step == 3:
      raise KeyboardInterrupt  # as Ctrl-C would, after step 3's metrics are written

  with monkeypatch.context() as m:
    m.setattr(stage_lib.Stage, "log", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
      driver.run_from_config(config, str(tmp_path / "resumed"))
  assert str(info.value).startswith(
      "rl: interrupted after step 3; checkpoint written: a rerun resumes from step 3")
  assert max(r["step"] for r in _records(tmp_path / "resumed", "rl")) == 3
  driver.run_from_config(config, str(tmp_path / "resumed"))  # same workdir: resumes at step 3
  assert _records(tmp_path / "resumed", "rl") == straight


def test_grpo_runs_the_same_way(tmp_path):
  summary = driver.run_from_config(_micro(**{"rl.loss.kind": "grpo", "rl.steps": 2}), str(tmp_path))
  assert summary["rl"]["last_step"] == 2


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(tmp_path, monkeypatch):
  config = _micro(**{"reward.task": 0.0})
  config.reward.test_digit_share = 1.0
  monkeypatch.setattr(rl_trainer, "compute_advantages",
                      lambda kind, r, g, n: np.full(r.shape, np.nan, np.float32))
  with pytest.raises(stage_lib.NonFiniteError, match="2 consecutive steps had a non-finite"):
    driver.run_from_config(config, str(tmp_path))
  records = _records(tmp_path, "rl")
  # Step 1 (2 updates, both skipped), then the stop.
  assert [r["skipped"] for r in records if "skipped" in r] == [1.0]
  checkpoints = os.listdir(tmp_path / "rl" / "checkpoints")
  assert "1" in checkpoints


def test_stage_params_round_trip(tmp_path):
  train_config = schema.base_config()
  ctx = context.build_context(train_config, str(tmp_path))
  optimizer = optimizer_lib.make_optimizer(train_config.sft.optimizer, train_config.sft.steps)
  stage = stage_lib.Stage(ctx, "sft", train_config.sft.steps, optimizer, train_config.sft)
  params = model.init(ctx.model_cfg, jax.random.key(3))
  stage.save(train_config.sft.steps, state_lib.create(params, optimizer), {}, force=True)
  stage.checkpointer.close()
  (tmp_path / "config.json").write_text(train_config.to_json_best_effort())

  cfg, loaded = driver.stage_params(str(tmp_path / "sft"))
  assert cfg == ctx.model_cfg
  # A checkpoint restores bit for bit.
  jax.tree.map(np.testing.assert_array_equal, params, loaded)
  with pytest.raises(ValueError, match="stage directory"):
    driver.stage_params(str(tmp_path))


def _fake_sampler(group_rewards):
  """A sampler whose round n gives group_rewards[n] ([B][G] rewards); row r of round n carries
  token 100 n + r, so the test can tell which rows were kept."""

  def sample(params, round_index, key):
    del params, key
    rewards = np.asarray(group_rewards[round_index], np.float32).reshape(-1)
    rows = rewards.size
    ids = (100 * round_index + np.arange(rows))[:, None]
    return rl_trainer.Rollouts(
        tokens=ids, prompt_mask=np.ones((rows, 1), bool), completions=ids,
        logprobs=np.zeros((rows, 1), np.float32), lengths=np.ones(rows, np.int32),
        finish_reasons=np.ones(rows, np.int32), rewards=rewards, correct=rewards)

  return sample


def test_dynamic_sampling_refills_groups_from_new_prompts():
  rl = _micro(**{"rl.prompts_per_step": 3, "rl.samples_per_prompt": 2,
                 "rl.dynamic_sampling": True, "rl.max_sampling_rounds": 4}).rl
  # Round 0 has one informative group (the second); round 1 has two (the first two).
  sampler = _fake_sampler([[[1, 1], [0, 1], [0, 0]], [[0, 1], [1, 0], [1, 1]]])
  got, weights, metrics = rl_trainer.collect(sampler, None, iter(range(10)),
                                             jax.random.key(0), rl)
  assert got.tokens[:, 0].tolist() == [2, 3, 100, 101, 102, 103]
  np.testing.assert_array_equal(weights, np.ones(6))
  assert metrics["sampling_rounds"] == 2 and metrics["filled_groups_frac"] == 1.0
  assert metrics["reward"] == pytest.approx(0.5)  # of the first generation batch


def test_dynamic_sampling_pads_with_zero_weight_filler_rows():
  rl = _micro(**{"rl.prompts_per_step": 3, "rl.samples_per_prompt": 2,
                 "rl.dynamic_sampling": True, "rl.max_sampling_rounds": 2}).rl
  # Only one informative group in two rounds: the other two groups' rows are filler.
  sampler = _fake_sampler([[[1, 1], [0, 1], [0, 0]], [[1, 1], [0, 0], [1, 1]]])
  got, weights, metrics = rl_trainer.collect(sampler, None, iter(range(10)),
                                             jax.random.key(0), rl)
  assert got.tokens[:, 0].tolist() == [2, 3, 0, 1, 2, 3]  # filler: the first batch's first rows
  np.testing.assert_array_equal(weights, [1, 1, 0, 0, 0, 0])
  assert metrics["sampling_rounds"] == 2
  assert metrics["filled_groups_frac"] == pytest.approx(2 / 6)
  # Without dynamic sampling the first batch is used as it is.
  rl.dynamic_sampling = False
  got, weights, metrics = rl_trainer.collect(sampler, None, iter(range(10)),
                                             jax.random.key(0), rl)
  assert got.tokens[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and weights.sum() == 6
  assert metrics["sampling_rounds"] == 1


def test_sampler_and_trainer_mask_the_same_padded_vocabulary():
  """A model vocabulary padded beyond the tokenizer's: the sampler never emits the padded ids,
  and the trainer's log-probs of the samples, with the same vocab_limit, equal the sampler's
  (float32: summation order only, 1e-5); without the limit they would not."""
  from m1jax import config, generate  # pylint: disable=g-import-not-at-top
  cfg = config.preset("tiny", dtype="float32", num_hidden_layers=2, attn_type_list=(0, 1))
  params = dict(model.init(cfg, jax.random.key(0)))
  params["lm_head"] = params["lm_head"] * 40.0
  limit = 300
  gen = generate.GenerateConfig(max_new_tokens=12, repetition_window=0, eos_token_ids=(),
                                sampling=generate.SamplingConfig(1.0, vocab_limit=limit))
  out = generate.generate(cfg, params, [[1, 5, 7], [2, 9, 9, 9, 4]], gen, key=jax.random.key(1))
  assert int(out.tokens.max()) < limit
  mask = np.asarray(out.completion_mask)
  logprobs, entropy, _ = rl_trainer.response_logprobs(cfg, params, out.sequences,
                                                      out.sequence_mask, 12, 1.0, limit)
  np.testing.assert_allclose(np.where(mask, logprobs, 0), out.logprobs, atol=1e-5, rtol=0)
  assert np.all(np.isfinite(entropy))
  unmasked, _, _ = rl_trainer.response_logprobs(cfg, params, out.sequences, out.sequence_mask,
                                                12, 1.0)
  assert np.abs(np.where(mask, unmasked, 0) - out.logprobs).max() > 1e-2


@pytest.mark.parametrize("decode_slots", [0, 6])
def test_rl_step_reports_where_its_time_goes(tmp_path, decode_slots):
  """Phase timings and throughput every step; with rl.decode_slots the sampler refills slots."""
  driver.run_from_config(_micro(**{"rl.steps": 2, "rl.eval_every": 1,
                                   "rl.decode_slots": decode_slots}), str(tmp_path))
  with open(tmp_path / "rl" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  step = records[-1]
  for phase in ("generate", "score", "advantages", "update", "eval"):
    assert step[f"time/{phase}"] > 0, phase
  assert step["time/generated_tokens_per_s"] > 0 and step["time/trained_tokens_per_s"] > 0
  assert step["generated_tokens"] > 0 and 0 <= step["finished_slot_share"] < 1


def test_compilation_cache_is_configured_unless_set_elsewhere(tmp_path, monkeypatch):
  """The config's compilation_cache_dir turns JAX's persistent cache on (user-expanded, with the
  size limit); a directory already set (JAX_COMPILATION_CACHE_DIR, as this suite sets it) wins,
  and "" changes nothing."""
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
  assert before[0]  # tests/conftest.py
  try:
    assert context.configure_compilation_cache(str(tmp_path / "other"), 1.0) == before[0]
    jax.config.update("jax_compilation_cache_dir", None)
    assert context.configure_compilation_cache("", 1.0) is None
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path)
    assert context.configure_compilation_cache("~/cache_dir", 0.5) == f"{home}/cache_dir"
    assert jax.config.jax_compilation_cache_dir == f"{home}/cache_dir"
    assert jax.config.jax_compilation_cache_max_size == 2**29
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_compilation_cache_max_size", before[1])
  with pytest.raises(ValueError, match="compilation_cache_max_gb"):
    schema.validate(_micro(compilation_cache_max_gb=0.0))


@pytest.mark.parametrize("changes, message", [
    ({"rl.decode_slots": 4, "rl.drain_slots": 4}, "rl.drain_slots"),
    ({"rl.drain_slots": -2}, "rl.drain_slots"),
])
def test_bad_drain_slots_fail_naming_the_key(changes, message):
  with pytest.raises(ValueError, match=message):
    schema.validate(_micro(**changes))
  schema.validate(_micro(**{"rl.decode_slots": 4, "rl.drain_slots": 1}))
