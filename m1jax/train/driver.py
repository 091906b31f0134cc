"""Runs the stages a config asks for (SFT, RL, or SFT then RL) and summarises them."""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging

from m1jax import files
from m1jax.train import checkpoint, context, metrics, rl, schema, sft, stage


def run_from_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs config.mode ("sft", "rl", "sft_rl") in `workdir` (resuming what is there); returns a
  summary dict (also written to workdir/summary.json).

  Everything that can be checked is checked before anything is written: the config and its
  paths, the data's lengths, the batches against the mesh, and (in an existing workdir) the
  config against the stored one (`check_rerun`). After an error the in-flight checkpoint is
  finished before the error propagates."""
  schema.validate(config)
  schema.check_paths(config)
  context.configure_compilation_cache(config.compilation_cache_dir, config.compilation_cache_max_gb)
  ctx = context.build_context(config, workdir)
  schema.check_batches(config, dict(ctx.mesh.shape))
  allowed = check_rerun(config, workdir)
  try:
    return _run(ctx, config, workdir, allowed)
  finally:
    checkpoint.close_all()


def _stage_progress(workdir: str) -> tuple[dict[str, int], list[str]]:
  """({stage: latest checkpoint step} of the stages with one, [stages stopped on non-finite
  steps]) of a workdir."""
  started, stopped = {}, []
  for name in ("sft", "rl"):
    directory = os.path.join(workdir, name, "checkpoints")
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(
        directory) else []
    if steps:
      started[name] = max(steps)
    if os.path.exists(os.path.join(workdir, name, stage.NONFINITE_MARKER)):
      stopped.append(name)
  return started, stopped


def check_rerun(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The changes of `config` against `workdir/config.json` that a rerun may make
  ({key: (stored, new)}, see schema.rerun_changes); raises ValueError naming every other changed
  key with both values. Writes nothing."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the stored config of this workdir ({e})") from None
  started, stopped = _stage_progress(workdir)
  allowed, refused = schema.rerun_changes(stored, config, started, stopped)
  if refused:
    lines = "; ".join(f"config.{k}: {before!r} -> {after!r}" for k, (before, after)
                      in refused.items())
    raise ValueError(
        f"{workdir} holds a run with another config ({path}); these changes would mix two "
        f"configs in one run: {lines}. Use another --workdir, or the stored values (allowed "
        f"changes: steps with a constant schedule, {', '.join(schema.RERUN_ALLOWED)}, and "
        "anything of a stage that has not started or stopped on non-finite steps)")
  return allowed


def _run(ctx: context.Context, config: ml_collections.ConfigDict, workdir: str,
         allowed: dict) -> dict:
  os.makedirs(workdir, exist_ok=True)
  if ctx.is_main:
    # Atomically: the other processes of a multi-process run read it in check_rerun.
    files.write_atomically(os.path.join(workdir, "config.json"),
                           config.to_json_best_effort(indent=2))
    if allowed:
      logging.warning("config changes from the stored run (recorded in config_changes.jsonl): %s",
                      ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in allowed.items()))
      with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "changes": {k: list(v) for k, v in allowed.items()}}) + "\n")
  summary = {"workdir": os.path.abspath(workdir)}
  stages = []
  sft_stage = None
  if config.mode in ("sft", "sft_rl"):
    sft_stage = sft.train(ctx)
    stages.append(sft_stage)
    summary["sft"] = _stage_summary(sft_stage.dir)
  if config.mode in ("rl", "sft_rl"):
    if config.rl.init_from:
      init_params = lambda shardings: _init_from(ctx, config.rl.init_from)
    elif sft_stage is not None:
      init_params = lambda shardings: sft_stage.final_params()
    else:
      init_params = lambda shardings: context.initial_params(ctx, shardings)
    rl_stage = rl.train(ctx, init_params)
    stages.append(rl_stage)
    summary["rl"] = _stage_summary(rl_stage.dir)
  summary["complete_before_run"] = all(s.complete_at_start for s in stages)
  if ctx.is_main:
    files.write_atomically(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  return summary


def _init_from(ctx: context.Context, stage_dir: str):
  """Final params of another run's SFT stage directory (config.rl.init_from)."""
  try:
    return stage.restore_params(ctx, os.path.abspath(stage_dir), ctx.config.sft)
  except ValueError as e:
    raise ValueError(f"config.rl.init_from={stage_dir!r}: {e}; train that SFT stage first (the "
                     "config file's docstring gives the command; for configs/rl/*_arithmetic.py, "
                     "`make ablation OBJECTIVE=<kind>` runs both)") from None


def stage_params(stage_dir: str):
  """(ModelConfig, final params on one device) of a training stage `<workdir>/sft` or
  `<workdir>/rl`, from the run's `<workdir>/config.json` and the stage's latest checkpoint."""
  stage_dir = os.path.abspath(stage_dir)
  workdir, name = os.path.split(stage_dir)
  if name not in ("sft", "rl"):
    raise ValueError(f"{stage_dir!r}: expected a stage directory <workdir>/sft or <workdir>/rl")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise ValueError(f"{stage_dir!r}: no {config_path} (written by experiments/train.py)")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  ctx = context.build_context(config, workdir, read_data=False)
  try:
    params = stage.restore_params(ctx, stage_dir, config[name])
  except ValueError as e:
    raise ValueError(f"{stage_dir!r}: {e}") from None
  return ctx.model_cfg, jax.device_put(params, jax.devices()[0])


def _stage_summary(stage_dir: str) -> dict:
  """First and last held-out evaluation of a stage, from its metrics.jsonl."""
  records = metrics.read_jsonl(os.path.join(stage_dir, "metrics.jsonl"))
  records = [r for r in records if "eval/reward" in r]
  if not records:
    logging.warning("no evaluation records in %s", stage_dir)
    return {}
  first, last = records[0], records[-1]
  keys = [k for k in first if k.startswith("eval/")]
  return {"first_step": first["step"], "last_step": last["step"],
          **{f"{k}@start": first[k] for k in keys}, **{f"{k}@end": last[k] for k in keys},
          "time_s": last.get("time_s")}


def format_summary(summary: dict) -> str:
  """A few lines for the terminal: held-out reward before/after each stage and where outputs are."""
  workdir = summary["workdir"]
  lines = []
  if summary.get("complete_before_run"):
    lines.append(f"Nothing to do: the run in {workdir} is complete (every stage's last checkpoint "
                 "is at its final step). Its results follow; to train again use another --workdir.")
  lines.append(f"run directory: {workdir} (summary.json, config.json)")
  for name in ("sft", "rl"):
    s = summary.get(name)
    if not s:
      continue
    start, end = s.get("eval/reward@start"), s.get("eval/reward@end")
    acc_start, acc_end = s.get("eval/accuracy@start"), s.get("eval/accuracy@end")
    lines.append(
        f"{name}: held-out reward {start:.3f} -> {end:.3f} ({end - start:+.3f}), accuracy "
        f"{acc_start:.3f} -> {acc_end:.3f}, steps {s['first_step']}..{s['last_step']}, "
        f"{s.get('time_s') or 0:.0f} s; curves: {workdir}/{name}/metrics.png")
  return "\n".join(lines)
