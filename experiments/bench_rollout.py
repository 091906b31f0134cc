r"""Rollout throughput of `generate`: the decode step against its HBM floor, and slot refill
against the static batch on a long-tailed mix of lengths, side by side in one run.

  python -m experiments.bench_rollout --out_dir=results/rollout     # one GPU, small preset
  # Which switch makes the B = 64 decode step slow (one GPU; the no-EOS rows only):
  python -m experiments.bench_rollout --param_dtypes=bfloat16 --mix=false --new_tokens=256 \
      --variants="moe_gemm_impl=xla;lightning_impl=pallas" --out_dir=results/rollout_variants
  # CPU smoke run:
  python -m experiments.bench_rollout --preset=tiny --rows=8 --new_tokens=16 --slots=4 \
      --out_dir=/tmp/rollout

Runs: every row to --new_tokens (no EOS) at --rows, once per --param_dtypes entry and once per
--variants entry (ModelConfig changes, bf16 params); then (--mix) rows ending with probability
1 / --mean_length per token (geometric lengths) as one static batch and with --slots decode
slots refilled from the same prompts. Writes rollout.csv and rollout.md; each row's table is
logged as soon as it is measured (every generate shape compiles first: 30-60 s on an H200).
"""

import os

from absl import app, flags
import jax

from experiments import reporting
from experiments.benchmarks import rollout
from m1jax import config, model

_PRESET = flags.DEFINE_string("preset", "small", "config.preset name.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (and the 16-bit params' dtype).")
_PARAM_DTYPES = flags.DEFINE_list("param_dtypes", ["float32", "bfloat16"],
                                  "Params dtypes of the no-EOS runs.")
_ROWS = flags.DEFINE_list("rows", ["64", "256"], "Batch sizes of the no-EOS runs.")
_VARIANTS = flags.DEFINE_string(
    "variants", "", "';'-separated ModelConfig changes, each ','-separated name=value (e.g. "
    "\"moe_gemm_impl=xla;lightning_impl=pallas\"): no-EOS runs at --rows with --dtype params.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 1024, "Tokens generated per row at most.")
_MIX = flags.DEFINE_bool("mix", True, "Time the long-tailed mix, static and with slot refill.")
_MEAN_LENGTH = flags.DEFINE_float("mean_length", 128.0, "Mean length of the long-tailed mix.")
_MIX_ROWS = flags.DEFINE_integer("mix_rows", 1024, "Prompts of the long-tailed mix.")
_SLOTS = flags.DEFINE_integer("slots", 256, "Decode slots of the refill run (and static rows).")
_REFILL_ROWS = flags.DEFINE_integer("refill_rows", 0, "Prompts per refill (0: slots / 4).")
_DRAIN_SLOTS = flags.DEFINE_list(
    "drain_slots", ["-1"], "Refill runs, one per entry: slots the tail drains into (-1: slots / 4; "
    "0: never).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed generate calls per row (the median is reported).")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/rollout", "CSV and table folder.")


def main(argv):
  del argv
  variants = reporting.model_variants(_VARIANTS.value)  # a misspelled field stops here, before any compile
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "rollout.log"))
  log(reporting.versions())
  results = []

  def static_rows(label: str, cfg):
    params = model.init(cfg, jax.random.key(0))
    for rows in (int(r) for r in _ROWS.value):
      results.append(rollout.time_generate(cfg, params, rows, _PROMPT_LEN.value,
                                           _NEW_TOKENS.value, reps=_REPS.value))
      results[-1].mode = f"static, {label}"
      log(rollout.table(results[-1:]))

  for param_dtype in _PARAM_DTYPES.value:
    static_rows(f"{param_dtype} params",
                config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=param_dtype))
  for changes in variants:
    label = reporting.describe_overrides(changes, sep=", ")
    static_rows(f"{_DTYPE.value} params, {label}",
                config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value,
                              **changes))
  if _MIX.value:
    cfg = config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value)
    params = model.init(cfg, jax.random.key(0))
    runs = [(0, -1)] + [(_SLOTS.value, int(d)) for d in _DRAIN_SLOTS.value]
    for slots, drain in runs:
      results.append(rollout.time_generate(
          cfg, params, _MIX_ROWS.value if slots else _SLOTS.value, _PROMPT_LEN.value,
          _NEW_TOKENS.value, mean_length=_MEAN_LENGTH.value, slots=slots,
          refill_rows=_REFILL_ROWS.value, drain_slots=drain, reps=_REPS.value))
      log(rollout.table(results[-1:]))
  reporting.write_results(_OUT_DIR.value, "rollout", results, rollout.table(results), log)


if __name__ == "__main__":
  app.run(main)
