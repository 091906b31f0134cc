r"""Where the device time of one program goes, read from the XLA profiler's trace: the RL train
step (rl_update) or a whole generate call, each kernel attributed to the model component whose
code emitted it (experiments/benchmarks/profile.py).

  python -m experiments.profile_step --step=train --rows=16 --seq_len=1024 --out_dir=results/prof
  python -m experiments.profile_step --step=generate --rows=256 --new_tokens=256 \
      --out_dir=results/prof_decode
  # CPU smoke run:
  python -m experiments.profile_step --preset=tiny --step=generate --rows=4 --new_tokens=8 \
      --out_dir=/tmp/prof

generate: the prefill and every decode step are in one call; components are prefixed by their
phase ("prefill: ...", "decode: ..."), and the decode rows are also given per decode step
(--new_tokens - 1 steps, no EOS). Writes profile_<step>.md (the component table and the top
HLO ops), components_<step>.csv and ops_<step>.csv to --out_dir, and with --dump_hlo the
optimized HLO of the program (hlo_<step>.txt).
"""

import os

from absl import app, flags
import jax

from experiments import reporting
from experiments.benchmarks import profile, train_step
from m1jax import config, generate, model
from m1jax.rl import losses
from m1jax.train import rl
from m1jax.train import state as state_lib

_STEP = flags.DEFINE_enum("step", "train", ["train", "generate"], "The program to profile.")
_PRESET = flags.DEFINE_string("preset", "small", "config.preset name.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "Params dtype.")
_OVERRIDES = flags.DEFINE_list("model", [], "ModelConfig fields as name=value.")
_ROWS = flags.DEFINE_integer("rows", 16, "Sequences (train) or prompts (generate).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "train: tokens per sequence (1/8 prompt).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "generate: prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "generate: tokens per row (no EOS).")
_REPS = flags.DEFINE_integer("reps", 3, "Profiled calls (after one untimed call).")
_TOP = flags.DEFINE_integer("top", 30, "HLO ops listed.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/profile", "Output folder.")
_DUMP_HLO = flags.DEFINE_bool("dump_hlo", False, "Also write the compiled program's optimized HLO "
                              "(hlo_<step>.txt), where the ops table's HLO op names are defined.")


def _train_program(cfg):
  params = model.init(cfg, jax.random.key(0))
  optimizer = train_step.make_optimizer()
  state = jax.jit(lambda p: state_lib.create(p, optimizer))(params)
  seq_len = _SEQ_LEN.value
  batch = jax.device_put(train_step.rollout_batch(cfg, _ROWS.value, seq_len // 8,
                                                  seq_len - seq_len // 8))
  step = jax.jit(lambda s, b: rl.rl_update(cfg, losses.LossConfig(kind="cispo"), 1.0, optimizer,
                                           s, b))
  return step.lower(state, batch).compile(), (state, batch)


def _generate_program(cfg):
  params = model.init(cfg, jax.random.key(0))
  prompts = jax.random.randint(jax.random.key(1), (_ROWS.value, _PROMPT_LEN.value), 0,
                               cfg.vocab_size)
  gen = generate.GenerateConfig(max_new_tokens=_NEW_TOKENS.value, repetition_window=0,
                                sampling=generate.SamplingConfig(1.0))
  program = jax.jit(lambda p, t, k: generate.generate(cfg, p, t, gen, key=k))
  key = jax.random.key(0)
  return program.lower(params, prompts, key).compile(), (params, prompts, key)


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, f"profile_{_STEP.value}.log"))
  log(reporting.versions())
  cfg = config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value,
                      **reporting.model_overrides(_OVERRIDES.value))
  build = _train_program if _STEP.value == "train" else _generate_program
  compiled, args = build(cfg)
  if _DUMP_HLO.value:
    with open(os.path.join(_OUT_DIR.value, f"hlo_{_STEP.value}.txt"), "w") as f:
      f.write(compiled.as_text())
  result = profile.profile(compiled, args, _REPS.value, profile.model_classifier(cfg),
                           top=_TOP.value)
  log("events per trace line: " + ", ".join(f"{k}: {v}" for k, v in result.lines.items()))
  shape = (f"{_ROWS.value} x {_SEQ_LEN.value} tokens" if _STEP.value == "train" else
           f"{_ROWS.value} rows, prompt {_PROMPT_LEN.value}, {_NEW_TOKENS.value} new tokens")
  text = [f"{_STEP.value}, {_PRESET.value} preset, {shape}, {_DTYPE.value} compute, "
          f"{_PARAM_DTYPE.value} params, {_REPS.value} profiled calls",
          profile.component_table(result)]
  if _STEP.value == "generate":
    steps = max(_NEW_TOKENS.value - 1, 1)
    text.append(f"per decode step ({steps} steps per call):\n\n" + profile.per_step_table(
        result, "decode: ", steps))
  text.append(profile.ops_table(result))
  reporting.write_dataclass_csv(os.path.join(_OUT_DIR.value, f"components_{_STEP.value}.csv"),
                                result.components)
  reporting.write_dataclass_csv(os.path.join(_OUT_DIR.value, f"ops_{_STEP.value}.csv"),
                                result.top_ops)
  with open(os.path.join(_OUT_DIR.value, f"profile_{_STEP.value}.md"), "w") as f:
    f.write("\n\n".join(text) + "\n")
  log("\n\n".join(text))


if __name__ == "__main__":
  app.run(main)
