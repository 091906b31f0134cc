"""Every key a training config may set, with its default, and the checks run before training.

Configs in configs/ start from `base_config()` and change values; `validate` rejects keys that are
not here, wrong types and impossible values, naming the key (`--config.rl.loss.kind=grpo` style
overrides are checked the same way after parsing).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections.config_flags import config_path

from m1jax import config as model_config
from m1jax.rl import losses, rewards

MODES = ("sft", "rl", "sft_rl")
TASKS = ("arithmetic", "countdown", "jsonl", "code", "code_jsonl")
CODE_TASKS = ("code", "code_jsonl")  # scored by running programs (config.code)
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "batch_std")
OLD_LOGPROBS = ("sampler", "recompute")
SCHEDULES = ("constant", "cosine")


def _optimizer(learning_rate: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, schedule="constant", warmup_steps=0, final_lr_fraction=0.1,
      b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0, grad_clip=1.0))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "sft_rl"  # sft, rl, or sft then rl (the RL stage starts from the SFT checkpoint)
  c.model = model_fields("tiny")
  c.tokenizer = "byte"  # "byte" or a tokenizer.json path / directory
  c.task = ml_collections.ConfigDict(dict(
      name="arithmetic", jsonl_path="", eval_size=256, eval_fraction=0.1,
      eval_seed=0))  # the held-out set depends on eval_seed only, not on the run's seed
  c.task.kwargs = ml_collections.ConfigDict()  # task difficulty knobs (m1jax.data.tasks)
  # JSONL data: drop examples over a length limit of the run (sft.max_len, rl.max_prompt_len)
  # when the data set is read, instead of stopping there with an error naming them.
  c.task.drop_long = False
  c.reward = ml_collections.ConfigDict(dict(task=1.0, format=0.0))  # weighted reward components
  c.code = code_config()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))  # -1: the rest
  c.sft = ml_collections.ConfigDict(dict(
      steps=200, batch_size=64, max_len=64, log_every=10, eval_every=0))
  c.sft.optimizer = _optimizer(3e-3)
  c.rl = ml_collections.ConfigDict(dict(
      steps=100,
      prompts_per_step=16,  # groups per generation batch
      samples_per_prompt=8,  # G responses per prompt
      updates_per_batch=1,  # mu: optimizer steps (minibatches) per generation batch
      max_prompt_len=32,
      max_new_tokens=32,
      temperature=1.0,
      top_p=1.0,
      top_k=0,
      advantage="grpo",
      dynamic_sampling=True,  # drop groups whose rewards are all equal, refill from new prompts
      max_sampling_rounds=4,  # generation batches tried per step to fill the batch
      decode_slots=0,  # 0: decode the batch together; > 0: that many slots, refilled as rows end
      refill_rows=0,  # with decode_slots: prompts prefilled per refill (0: a quarter of the slots)
      # with decode_slots: once no prompt is pending, the unfinished rows move into this many
      # slots (-1: a quarter of decode_slots; 0: never)
      drain_slots=-1,
      repetition_window=3000,  # M1 early truncation: stop after this many tokens with p > prob
      repetition_prob=0.99,
      init_from="",  # checkpoint dir of an SFT run; default: this run's SFT stage (mode sft_rl)
      log_every=1,
      eval_every=10,
      # The old policy of the objective's ratio: the sampler's log-probs, or "recompute": one
      # trainer forward before the first update (the sampler's become the rollout policy's).
      # A rollout_correction other than "none" implies recompute.
      old_logprobs="sampler",
      routing_replay=False,  # the trainer's MoE uses the sampler's experts for response tokens
      rollout_lag=0,  # the sampler uses the params of this many steps ago (asynchronous RL)
      # Staged length-window expansion: entries made by rl_stage(); () runs one stage (rl itself)
      stages=(),
  ))
  c.rl.overlong = ml_collections.ConfigDict(dict(enabled=False, max_length=32, cache_length=8))
  c.rl.loss = ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(losses.LossConfig)})
  c.rl.optimizer = _optimizer(1e-3)
  c.eval = ml_collections.ConfigDict(dict(batch_size=128, max_new_tokens=32))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, keep=2))
  c.max_consecutive_nonfinite = 5  # stop (with a checkpoint) after this many skipped steps in a row
  c.tensorboard = True
  c.progress = True  # tqdm progress bar
  # JAX's persistent compilation cache: a rerun (or another run of the same shapes) loads its
  # compiled programs instead of compiling them again. "" turns it off; JAX_COMPILATION_CACHE_DIR
  # (or jax.config's jax_compilation_cache_dir), when set, wins. Least recently used entries go
  # beyond compilation_cache_max_gb.
  c.compilation_cache_dir = "~/.cache/m1jax/jax_compilation_cache"
  c.compilation_cache_max_gb = 20.0
  return c


def code_config() -> ml_collections.ConfigDict:
  """The code reward's sandbox (m1jax.rl.rewards.code; docs/code_reward.md)."""
  return ml_collections.ConfigDict(dict(
      time_limit_s=2.0,  # wall and CPU seconds for all of one program's tests (a problem's
                         # "time_limit_s" overrides it)
      memory_mb=256,  # address space of the program's process (RLIMIT_AS)
      max_processes=8,  # RLIMIT_NPROC of the sandbox's uid (threads count)
      max_output_bytes=1 << 20,  # stdout + stderr; more ends the program (reason output_limit)
      max_file_bytes=1 << 20,  # RLIMIT_FSIZE
      max_dir_bytes=16 << 20,  # size of the program's directory (a tmpfs)
      startup_grace_s=2.0,  # wall seconds for starting bwrap and Python (before the time limit)
      workers=2,  # programs run concurrently
      bwrap="bwrap",  # the bubblewrap executable
      python_prefix="",  # the Python installation programs run with ("": this interpreter's)
      partial_credit=False,  # reward = share of tests passed instead of all-or-nothing
      # Runs model-generated code WITHOUT ANY ISOLATION (no namespaces, read-only filesystem or
      # uid change) when bubblewrap is unavailable. Never for untrusted models.
      unsafe_no_sandbox=False,
  ))


def _validate_code(cfg: ml_collections.ConfigDict, require) -> None:
  c = cfg.code
  for key in ("time_limit_s", "memory_mb", "max_processes", "max_output_bytes", "max_file_bytes",
              "max_dir_bytes", "workers"):
    require(c[key] > 0, f"code.{key}", "must be positive")
  require(c.startup_grace_s >= 0, "code.startup_grace_s", "must be >= 0")
  require(c.unsafe_no_sandbox or c.bwrap, "code.bwrap", "must name the bubblewrap executable")


# ModelConfig (and KernelConfig) fields whose default is None, with the type a value must have.
_OPTIONAL_FIELDS = {"moe_capacity_factor": float, "bos_token_id": int, "eos_token_id": int,
                    "segment_len": int, "state_num_stages": int}
# With model.hf_dir, the architecture comes from the checkpoint and only these fields apply.
COMPUTE_KNOBS = ("dtype", "param_dtype", "lm_head_dtype", "lm_head_precision",
                 "lm_head_grad_precision", "lightning_impl",
                 "lightning_kernel", "attention_impl", "moe_impl", "moe_gemm_impl",
                 "moe_fuse_gate_up_rows", "moe_dense_decode_rows", "moe_capacity_factor",
                 "remat_policy", "layer_scan_unroll")


def _dataclass_fields(obj) -> ml_collections.ConfigDict:
  fields = ml_collections.ConfigDict()
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    if value is None:
      value = ml_collections.FieldReference(None, field_type=_OPTIONAL_FIELDS[field.name])
    elif dataclasses.is_dataclass(value):
      value = _dataclass_fields(value)
    fields[field.name] = value
  return fields


def model_fields(preset: str = "tiny", **changes) -> ml_collections.ConfigDict:
  """Every ModelConfig field of `preset` (with `changes`), so each can be set from the command
  line (--config.model.num_hidden_layers=8, --config.model.lightning_kernel.block_size=128),
  plus hf_dir: a HF checkpoint to start from instead."""
  fields = _dataclass_fields(model_config.preset(preset, **changes))
  fields.hf_dir = ""
  return fields


def model_from_config(model_cfg: ml_collections.ConfigDict) -> model_config.ModelConfig:
  """The ModelConfig a config describes (its fields, or model.hf_dir plus COMPUTE_KNOBS)."""
  values = {k: v for k, v in model_cfg.items() if k != "hf_dir"}
  values["lightning_kernel"] = model_config.KernelConfig(**dict(values["lightning_kernel"]))
  if model_cfg.hf_dir:
    knobs = {k: values[k] for k in COMPUTE_KNOBS}
    return model_config.ModelConfig.from_hf(model_cfg.hf_dir, **knobs)
  return model_config.ModelConfig(**values)


def load_config(path: str, overrides: Mapping[str, Any] = ()) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (run from the repository root, as
  experiments/train.py is), with dotted-key overrides {"rl.loss.kind": "grpo", ...}."""
  spec = importlib.util.spec_from_file_location("m1jax_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in dict(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out[path] = value
      out.update(_paths(value, path + "."))
    else:
      out[path] = value
  return out


# Sub-dicts whose keys are free-form (checked by what consumes them).
_FREE_FORM = ("task.kwargs", "reward")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first unknown key, mistyped value or impossible value."""
  reference = _paths(base_config())
  for path, value in _paths(cfg).items():
    if any(path.startswith(p + ".") for p in _FREE_FORM):
      continue
    if path not in reference:
      parent = _parent(path)
      siblings = sorted(k.rsplit(".", 1)[-1] for k in reference if _parent(k) == parent)
      raise ValueError(f"config.{path}: unknown key; known keys here: {siblings}")
    expected = reference[path]
    if expected is not None and value is not None and not _same_kind(expected, value):
      raise ValueError(f"config.{path}={value!r}: expected {type(expected).__name__}")
  _check_finite_numbers(cfg)

  def require(ok, path, msg):
    if not ok:
      raise ValueError(f"config.{path}={cfg_get(cfg, path)!r}: {msg}")

  require(cfg.mode in MODES, "mode", f"must be one of {MODES}")
  require(cfg.task.name in TASKS, "task.name", f"must be one of {TASKS}")
  require(cfg.task.name not in ("jsonl", "code_jsonl") or cfg.task.jsonl_path, "task.jsonl_path",
          f"required for task.name={cfg.task.name}")
  _validate_code(cfg, require)
  require(cfg.task.eval_size > 0, "task.eval_size", "must be positive")
  require(0 < cfg.task.eval_fraction < 1, "task.eval_fraction", "must be in (0, 1)")
  if not cfg.model.hf_dir:
    try:
      model_from_config(cfg.model)
    except ValueError as e:
      raise ValueError(f"config.model: {e}") from None
  for axis in ("data", "fsdp", "tensor", "expert"):
    require(cfg.mesh[axis] == -1 or cfg.mesh[axis] >= 1, f"mesh.{axis}", "must be >= 1 or -1")
  require(sum(cfg.mesh[a] == -1 for a in ("data", "fsdp", "tensor", "expert")) <= 1, "mesh",
          "at most one axis may be -1")
  for stage in ("sft", "rl"):
    s = cfg[stage]
    for key in ("steps", "log_every"):
      require(s[key] >= 1, f"{stage}.{key}", "must be >= 1")
    require(s.eval_every >= 0, f"{stage}.eval_every", "must be >= 0 (0: only at the start and end)")
    o = s.optimizer
    require(o.learning_rate > 0, f"{stage}.optimizer.learning_rate", "must be positive")
    require(o.schedule in SCHEDULES, f"{stage}.optimizer.schedule", f"must be one of {SCHEDULES}")
    require(0 <= o.b1 < 1, f"{stage}.optimizer.b1", "must be in [0, 1)")
    require(0 <= o.b2 < 1, f"{stage}.optimizer.b2", "must be in [0, 1)")
    require(o.eps >= 0, f"{stage}.optimizer.eps", "must be >= 0")
    require(o.grad_clip >= 0, f"{stage}.optimizer.grad_clip", "must be >= 0 (0: off)")
    require(o.warmup_steps >= 0, f"{stage}.optimizer.warmup_steps", "must be >= 0")
    require(o.weight_decay >= 0, f"{stage}.optimizer.weight_decay", "must be >= 0")
  require(cfg.sft.batch_size >= 1, "sft.batch_size", "must be >= 1")
  require(cfg.sft.max_len >= 2, "sft.max_len", "must be >= 2")
  r = cfg.rl
  require(r.prompts_per_step >= 1, "rl.prompts_per_step", "must be >= 1")
  require(r.samples_per_prompt >= 2, "rl.samples_per_prompt", "group advantages need >= 2 samples")
  require(r.updates_per_batch >= 1, "rl.updates_per_batch", "must be >= 1")
  rows = r.prompts_per_step * r.samples_per_prompt
  require(rows % r.updates_per_batch == 0, "rl.updates_per_batch",
          f"must divide prompts_per_step * samples_per_prompt = {rows}")
  require(r.max_prompt_len >= 1, "rl.max_prompt_len", "must be >= 1")
  require(r.max_new_tokens >= 1, "rl.max_new_tokens", "must be >= 1")
  require(r.temperature > 0, "rl.temperature", "RL samples: must be > 0")
  require(0 < r.top_p <= 1, "rl.top_p", "must be in (0, 1]")
  require(r.top_k >= 0, "rl.top_k", "must be >= 0 (0: off)")
  require(r.advantage in ADVANTAGES, "rl.advantage", f"must be one of {ADVANTAGES}")
  require(r.max_sampling_rounds >= 1, "rl.max_sampling_rounds", "must be >= 1")
  require(r.decode_slots >= 0, "rl.decode_slots", "must be >= 0 (0: no slot refill)")
  require(r.refill_rows >= 0, "rl.refill_rows", "must be >= 0 (0: a quarter of the slots)")
  require(not r.decode_slots or r.refill_rows <= r.decode_slots, "rl.refill_rows",
          f"must not exceed rl.decode_slots={r.decode_slots}")
  require(r.drain_slots >= -1 and (not r.decode_slots or r.drain_slots < r.decode_slots),
          "rl.drain_slots", f"must be -1 (a quarter of the slots), 0 (never) or in [1, "
          f"rl.decode_slots={r.decode_slots})")
  require(r.repetition_window >= 0, "rl.repetition_window", "must be >= 0 (0: off)")
  require(0 <= r.repetition_prob < 1, "rl.repetition_prob", "must be in [0, 1)")
  require(r.old_logprobs in OLD_LOGPROBS, "rl.old_logprobs", f"must be one of {OLD_LOGPROBS}")
  require(r.rollout_lag >= 0, "rl.rollout_lag", "must be >= 0 (0: on-policy sampling)")
  if r.overlong.enabled:
    require(0 < r.overlong.cache_length < r.overlong.max_length, "rl.overlong.cache_length",
            "must be in (0, rl.overlong.max_length)")
  try:
    losses.LossConfig(**r.loss.to_dict())
  except ValueError as e:
    raise ValueError(f"config.rl.loss: {e}") from None
  require(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
  require(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
  require(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
  require(cfg.compilation_cache_max_gb > 0, "compilation_cache_max_gb", "must be positive")
  require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  require(cfg.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", "must be >= 1")
  for key, weight in cfg.reward.items():
    try:
      rewards.get_reward_fn(key)
    except (KeyError, ValueError) as e:
      raise ValueError(f"config.reward.{key}: {e}") from None
    require(isinstance(weight, (int, float)) and weight >= 0, f"reward.{key}",
            "weights must be >= 0")
  require(any(w > 0 for w in cfg.reward.values()), "reward", "needs a positive weight")
  if cfg.rl.stages:
    validate_stages(cfg)


def _same_kind(expected, value) -> bool:
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(expected, bool) and isinstance(value, bool)
  if isinstance(expected, (int, float)):
    return isinstance(value, (int, float)) and (isinstance(expected, float)
                                                or isinstance(value, int))
  if isinstance(expected, ml_collections.ConfigDict):
    return isinstance(value, ml_collections.ConfigDict)
  return isinstance(value, type(expected))


def _parent(path: str) -> str:
  return path.rsplit(".", 1)[0] if "." in path else ""


def cfg_get(cfg: ml_collections.ConfigDict, path: str):
  for key in path.split("."):
    cfg = cfg[key]
  return cfg


def unknown_key(cfg: ml_collections.ConfigDict, path: str) -> str | None:
  """None when the dotted key `path` ("rl.steps", "rl.stages[1].steps") is in `cfg`; else one
  line naming the first missing key's full path and the closest known key there
  ("config.rl.step: unknown key; did you mean config.rl.steps?")."""
  node, walked = cfg, ""
  for key in config_path.split(path):  # "rl.stages[1].steps" -> ("rl", "stages", 1, "steps")
    if isinstance(key, int):
      if not isinstance(node, (tuple, list)):
        return f"config.{walked[:-1]}={node!r} is not a list of entries: no entry [{key}]"
      if not -len(node) <= key < len(node):
        return f"config.{walked[:-1]} has {len(node)} entries: no entry [{key}]"
      node, walked = node[key], f"{walked[:-1]}[{key}]."
      continue
    if not isinstance(node, ml_collections.ConfigDict):
      return f"config.{walked[:-1]}={node!r} is a value, not a group of keys: no key {key!r}"
    if key not in node:
      close = difflib.get_close_matches(key, list(node.keys()), n=1)
      hint = (f"did you mean config.{walked}{close[0]}?" if close
              else f"known keys here: {sorted(node.keys())}")
      return f"config.{walked}{key}: unknown key; {hint}"
    node, walked = node[key], f"{walked}{key}."
  return None


def _check_finite_numbers(cfg: ml_collections.ConfigDict) -> None:
  """No key takes NaN or +-inf (e.g. --config.rl.optimizer.learning_rate=inf)."""
  for path, value in _paths(cfg).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"config.{path}={value!r}: must be a finite number")


# --- paths -----------------------------------------------------------------------------------
def _has_checkpoint(stage_dir: str) -> bool:
  """Whether `stage_dir/checkpoints` holds a finished orbax step directory."""
  directory = os.path.join(stage_dir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_paths(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key of the first input path of `cfg` that is missing or holds
  the wrong thing (the JSONL data, the HF checkpoint, the tokenizer, rl.init_from). Reads only
  small files; creates nothing."""
  if cfg.task.name in ("jsonl", "code_jsonl") and not os.path.isfile(cfg.task.jsonl_path):
    raise ValueError(f"config.task.jsonl_path={cfg.task.jsonl_path!r}: no such file")
  if cfg.model.hf_dir:
    hf_dir = cfg.model.hf_dir
    if not os.path.isdir(hf_dir):
      raise ValueError(f"config.model.hf_dir={hf_dir!r}: no such directory")
    if not any(os.path.isfile(os.path.join(hf_dir, name))
               for name in ("model.safetensors", "model.safetensors.index.json")):
      raise ValueError(f"config.model.hf_dir={hf_dir!r}: no model.safetensors nor "
                       "model.safetensors.index.json")
    try:
      model_from_config(cfg.model)
    except (OSError, ValueError) as e:
      raise ValueError(f"config.model.hf_dir={hf_dir!r}: {e}") from None
  if cfg.tokenizer != "byte" and not os.path.exists(cfg.tokenizer):
    raise ValueError(f"config.tokenizer={cfg.tokenizer!r}: no such file or directory")
  if cfg.mode in ("rl", "sft_rl") and cfg.rl.init_from:
    if not _has_checkpoint(cfg.rl.init_from):
      raise ValueError(f"config.rl.init_from={cfg.rl.init_from!r}: no checkpoint in "
                       f"{os.path.join(cfg.rl.init_from, 'checkpoints')}; train that SFT stage "
                       "first (the config file's docstring gives the command; for "
                       "configs/rl/*_arithmetic.py, `make ablation OBJECTIVE=<kind>` runs both)")


# --- the mesh ----------------------------------------------------------------------------------
def check_batches(cfg: ml_collections.ConfigDict, mesh_shape: Mapping[str, int]) -> None:
  """Raises ValueError when a batch of `cfg` does not split evenly over the batch axes
  (data x fsdp x expert) of a mesh of `mesh_shape` ({"data": 1, "fsdp": 8, ...})."""
  devices = math.prod(mesh_shape.get(a, 1) for a in ("data", "fsdp", "expert"))
  mesh = ", ".join(f"{k}={v}" for k, v in mesh_shape.items())
  where = f"the {devices} batch devices (data x fsdp x expert) of the mesh ({mesh})"
  if cfg.mode in ("sft", "sft_rl") and cfg.sft.batch_size % devices:
    raise ValueError(f"config.sft.batch_size={cfg.sft.batch_size}: must divide over {where}")
  if cfg.mode in ("rl", "sft_rl"):
    r = cfg.rl
    rows = r.prompts_per_step * r.samples_per_prompt // r.updates_per_batch
    if rows % devices:
      raise ValueError(
          f"config.rl.prompts_per_step={r.prompts_per_step}: a minibatch of prompts_per_step * "
          f"samples_per_prompt / updates_per_batch = {rows} rows must divide over {where}")


# --- a rerun in an existing workdir ------------------------------------------------------------
# Keys whose change cannot alter what is computed: cadence, display, stop rules, the mesh.
RERUN_ALLOWED = ("sft.log_every", "sft.eval_every", "rl.log_every", "rl.eval_every",
                 "checkpoint.every_steps", "checkpoint.keep", "progress", "tensorboard",
                 "compilation_cache_dir", "compilation_cache_max_gb",
                 "max_consecutive_nonfinite", "mesh.data", "mesh.fsdp", "mesh.tensor",
                 "mesh.expert")


def flat_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"rl.loss.kind": "cispo", ...} of a config as plain JSON values (a ConfigDict or the dict
  of a config.json)."""
  if isinstance(config, ml_collections.ConfigDict):
    import json  # pylint: disable=g-import-not-at-top
    config = json.loads(config.to_json_best_effort())
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping) and not (prefix + key).startswith(_FREE_FORM):
      out.update(flat_values(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def rerun_changes(stored: Mapping[str, Any], config: ml_collections.ConfigDict,
                  started: Mapping[str, int], reopened: Sequence[str] = ()):
  """Compares a rerun's `config` with the one `stored` in its workdir -> (allowed, refused), each
  {key: (stored value, new value)}.

  Allowed: RERUN_ALLOWED; a stage's `steps` when it does not move below the stage's latest
  checkpoint and its schedule is constant (a cosine schedule depends on it); any key of a stage
  that has not started (`started`: stage name -> latest checkpoint step, for the stages that
  have one) or that stopped on non-finite steps (`reopened`: resumed from its last good
  checkpoint with new settings); `mode` while the RL stage has not started. The rest would mix
  two configs in one run.
  """
  old, new = flat_values(stored), flat_values(config)
  defaults = flat_values(base_config())
  allowed, refused = {}, {}
  for key in sorted(set(old) | set(new)):
    before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
    if before == after:
      continue
    if key not in old or key not in new:  # a key added to (or removed from) the schema since
      present = new.get(key, old.get(key))
      if key not in defaults or present == defaults[key]:
        continue
    stage = key.split(".", 1)[0]
    ok = (key in RERUN_ALLOWED
          or (stage in ("sft", "rl") and (stage not in started or stage in reopened))
          or (key == "mode" and "rl" not in started))
    if (not ok and key in ("sft.steps", "rl.steps") and isinstance(after, int)
        and after >= started[stage] and new.get(f"{stage}.optimizer.schedule") == "constant"):
      ok = True
    (allowed if ok else refused)[key] = (before, after)
  return allowed, refused


# --- rl.stages: staged length-window expansion ----------------------------------------------------
# A stage is a partial rl config: the rl keys below (None: keep the previous stage's value, the
# first stage's from rl) plus `steps` and `advance_when`, its end. Settings accumulate from stage
# to stage; the last stage runs until rl.steps.
STAGE_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_window",
                  "repetition_prob", "decode_slots", "refill_rows", "drain_slots",
                  "dynamic_sampling", "max_sampling_rounds", "advantage", "overlong.enabled",
                  "overlong.max_length", "overlong.cache_length", "optimizer.learning_rate", "optimizer.grad_clip") + tuple(
                      f"loss.{f.name}" for f in dataclasses.fields(losses.LossConfig))
# Per-step RL metrics a transition rule may watch (means over the stage's last `window` steps).
ADVANCE_METRICS = ("truncated_length", "truncated_repetition", "finished_eos", "response_length",
                   "reward", "accuracy", "entropy_mean", "filled_groups_frac")
# LossConfig fields whose default is None, with the type a stage's value must have.
_LOSS_OPTIONAL = {"aggregation": str, "max_length": int, "clip_eps_low": float,
                  "clip_eps_high": float, "is_ratio_cap": float, "is_ratio_min": float}


def _stage_template() -> ml_collections.ConfigDict:
  """Every key of an rl.stages entry, unset (None, typed as the rl key it changes)."""
  rl = base_config().rl
  stage = ml_collections.ConfigDict()
  stage.steps = 0  # > 0: the stage ends after this many steps (with a rule: at the latest)
  stage.advance_when = ml_collections.ConfigDict(dict(
      metric="truncated_length",
      below=ml_collections.FieldReference(None, field_type=float),
      above=ml_collections.FieldReference(None, field_type=float),
      window=4,  # steps of this stage the metric is averaged over
      min_steps=0))  # steps before the rule is first checked (at least `window`)
  for path in STAGE_SETTINGS:
    *parents, leaf = path.split(".")
    node, source = stage, rl
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node, source = node[parent], source[parent]
    kind = _LOSS_OPTIONAL.get(leaf) if parents == ["loss"] else None
    node[leaf] = ml_collections.FieldReference(None, field_type=kind or type(source[leaf]))
  return stage


def rl_stage(**settings) -> ml_collections.ConfigDict:
  """One entry of rl.stages with every key present (so `--config.rl.stages[1].loss.clip_eps_high
  =0.2` can set any of them), e.g. rl_stage(max_new_tokens=64, steps=20,
  optimizer=dict(learning_rate=3e-5)) or rl_stage(max_new_tokens=32,
  advance_when=dict(below=0.05, window=4))."""
  stage = _stage_template()
  _fill(stage, settings, "rl_stage")
  return stage


def _fill(node: ml_collections.ConfigDict, values: Mapping[str, Any], where: str) -> None:
  for key, value in values.items():
    if key not in node:
      raise ValueError(f"{where}.{key}: unknown key; known keys here: {sorted(node.keys())}")
    if isinstance(node[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ValueError(f"{where}.{key}={value!r}: expected a group of keys")
      _fill(node[key], value, f"{where}.{key}")
      continue
    kind = node.get_type(key)
    if value is not None and not _same_kind(kind(), value):
      raise ValueError(f"{where}.{key}={value!r}: expected {kind.__name__}")
    node[key] = value


def rl_stages(rl: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """rl.stages as complete entries (each rl_stage(**entry): entries may be plain dicts, as from
  `--config.rl.stages='({"max_new_tokens": 16, "steps": 5}, {"max_new_tokens": 32})'` or a
  config.json). Raises ValueError naming config.rl.stages[i].<key>."""
  stages = rl.stages
  if not isinstance(stages, (tuple, list)):
    raise ValueError(f"config.rl.stages={stages!r}: expected a tuple of rl_stage() entries")
  out = []
  for i, entry in enumerate(stages):
    where = f"config.rl.stages[{i}]"
    if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f"{where}={entry!r}: expected an rl_stage() entry (a group of keys)")
    values = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
    stage = _stage_template()
    _fill(stage, values, where)
    out.append(stage)
  return out


def stage_rl_configs(rl: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The rl config each stage runs with: rl, then each stage's set keys applied in order (without
  rl.stages). One entry, rl itself, when rl.stages is empty."""
  current = ml_collections.ConfigDict(rl.to_dict())
  current.stages = ()
  if not rl.stages:
    return [current]
  out = []
  for stage in rl_stages(rl):
    for path in STAGE_SETTINGS:
      value = cfg_get(stage, path)
      if value is not None:
        *parents, leaf = path.split(".")
        node = current
        for parent in parents:
          node = node[parent]
        node[leaf] = value
    out.append(ml_collections.ConfigDict(current.to_dict()))
  return out


def validate_stages(cfg: ml_collections.ConfigDict) -> None:
  """The checks of rl.stages (run by `validate`): known keys and types, a stage end for every
  stage but the last, stages that can start before rl.steps, and every stage's rl settings
  passing the checks rl's do; each error names config.rl.stages[i].<key>."""
  stages = rl_stages(cfg.rl)
  effective = stage_rl_configs(cfg.rl)
  earliest_start = 0
  for i, (stage, rl) in enumerate(zip(stages, effective)):
    where = f"config.rl.stages[{i}]"
    rule = stage.advance_when
    ruled = rule.below is not None or rule.above is not None
    last = i == len(stages) - 1
    if stage.steps < 0:
      raise ValueError(f"{where}.steps={stage.steps}: must be >= 0 (0: no step limit)")
    if rule.below is not None and rule.above is not None:
      raise ValueError(f"{where}.advance_when: set one of below={rule.below} and "
                       f"above={rule.above}")
    if rule.metric not in ADVANCE_METRICS:
      raise ValueError(f"{where}.advance_when.metric={rule.metric!r}: must be one of "
                       f"{ADVANCE_METRICS}")
    if rule.window < 1:
      raise ValueError(f"{where}.advance_when.window={rule.window}: must be >= 1")
    if rule.min_steps < 0:
      raise ValueError(f"{where}.advance_when.min_steps={rule.min_steps}: must be >= 0")
    if last and (stage.steps or ruled):
      raise ValueError(f"{where}: the last stage runs until rl.steps={cfg.rl.steps}; leave its "
                       "steps at 0 and advance_when.below / above unset")
    if not last and not (stage.steps or ruled):
      raise ValueError(f"{where}: needs an end, steps > 0 or advance_when.below / above (only "
                       "the last stage runs until rl.steps)")
    if earliest_start >= cfg.rl.steps:
      raise ValueError(f"{where}: starts at step {earliest_start} at the earliest, not before "
                       f"rl.steps={cfg.rl.steps}")
    shortest = max(rule.window, rule.min_steps) if ruled else stage.steps
    earliest_start += min(shortest, stage.steps) if stage.steps else shortest
    single = ml_collections.ConfigDict(cfg.to_dict())
    single.rl = rl
    try:
      validate(single)
    except ValueError as e:
      raise ValueError(str(e).replace("config.rl.", f"{where}.", 1)
                       .replace("config.rl:", f"{where}:", 1)) from None
