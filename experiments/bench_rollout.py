r"""Rollout throughput of `generate`: the decode step against its HBM floor, and slot refill
against the static batch on a long-tailed mix of lengths, side by side in one run.

  python -m experiments.bench_rollout --out_dir=results/rollout     # one GPU, small preset
  # CPU smoke run:
  python -m experiments.bench_rollout --preset=tiny --rows=8 --new_tokens=16 --slots=4 \
      --out_dir=/tmp/rollout

Runs: every row to --new_tokens (no EOS) with float32 and --dtype params at --rows; then rows
ending with probability 1 / --mean_length per token (geometric lengths) as one static batch and
with --slots decode slots refilled from the same prompts. Writes rollout.csv and rollout.md.
"""

import os

from absl import app, flags
import jax

from experiments import reporting
from experiments.benchmarks import rollout
from m1jax import config, model

_PRESET = flags.DEFINE_string("preset", "small", "config.preset name.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (and the 16-bit params' dtype).")
_ROWS = flags.DEFINE_list("rows", ["64", "256"], "Batch sizes of the no-EOS runs.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 1024, "Tokens generated per row at most.")
_MEAN_LENGTH = flags.DEFINE_float("mean_length", 128.0, "Mean length of the long-tailed mix.")
_MIX_ROWS = flags.DEFINE_integer("mix_rows", 1024, "Prompts of the long-tailed mix.")
_SLOTS = flags.DEFINE_integer("slots", 256, "Decode slots of the refill run (and static rows).")
_REFILL_ROWS = flags.DEFINE_integer("refill_rows", 0, "Prompts per refill (0: slots / 4).")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/rollout", "CSV and table folder.")


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "rollout.log"))
  log(reporting.versions())
  results = []
  for param_dtype in ("float32", _DTYPE.value):
    cfg = config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=param_dtype)
    params = model.init(cfg, jax.random.key(0))
    for rows in (int(r) for r in _ROWS.value):
      result = rollout.time_generate(cfg, params, rows, _PROMPT_LEN.value, _NEW_TOKENS.value)
      result.mode = f"static, {param_dtype} params"
      results.append(result)
      log(rollout.table(results[-1:]))
  cfg = config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value)
  params = model.init(cfg, jax.random.key(0))
  for slots in (0, _SLOTS.value):
    results.append(rollout.time_generate(
        cfg, params, _MIX_ROWS.value if slots else _SLOTS.value, _PROMPT_LEN.value,
        _NEW_TOKENS.value, mean_length=_MEAN_LENGTH.value, slots=slots,
        refill_rows=_REFILL_ROWS.value))
    log(rollout.table(results[-1:]))
  reporting.write_results(_OUT_DIR.value, "rollout", results, rollout.table(results), log)


if __name__ == "__main__":
  app.run(main)
