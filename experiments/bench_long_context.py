r"""Long context on one GPU: prefill + decode with `m1jax.generate` at long prompts, the hybrid
--preset model (7 lightning : 1 softmax) against its all-softmax twin, and the longest context
each fits.

For every context of --contexts (both models side by side at each), times a generate call of a
random prompt of that many tokens at --batch that decodes --new_tokens tokens (no EOS, no early
truncation, temperature 1; random --dtype weights): prefill seconds (a max_new_tokens=1 call),
decode ms per step, total seconds, compile seconds, XLA's memory estimate of the compiled program
and the device's peak memory (experiments/benchmarks/long_context.py says how). With --find_max,
then finds each model's longest context that runs without RESOURCE_EXHAUSTED: doubling from the
largest timed context (or --find_from), then bisecting to --max_resolution, up to --max_context.
Writes long_context.{csv,md}, long_context_max.{csv,md} and long_context.log to --out_dir. The
second command below is the search alone, for one model, from a context known to fit.

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m experiments.bench_long_context \
      --out_dir=results/long_context
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m experiments.bench_long_context --contexts= \
      --find_max --find_from=131072 --models=hybrid --out_dir=results/long_context_max_hybrid
  # CPU smoke run:
  python -m experiments.bench_long_context --preset=tiny --contexts=64,128 --new_tokens=4 \
      --find_max --max_context=512 --max_resolution=64 --out_dir=/tmp/long_context
"""

import os

from absl import app
from absl import flags
import jax

from experiments import reporting
from experiments.benchmarks import long_context
from m1jax import config, model

_OUT_DIR = flags.DEFINE_string("out_dir", os.environ.get("OUT", "results/long_context"),
                               "Folder for the CSVs, tables and log.")
_PRESET = flags.DEFINE_string("preset", "small", "config.preset name of the hybrid model.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", sorted(config.DTYPES),
                           "Parameter, activation and KV cache dtype.")
_MODELS = flags.DEFINE_list("models", ["hybrid", "all_softmax"], "Models to run, of these two.")
_CONTEXTS = flags.DEFINE_list("contexts", ["8192", "32768", "131072"],
                              "Prompt lengths timed (tokens per row); empty: no timing.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 1024, "Tokens generated per row (>= 2).")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows per generate call.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed calls per program after one untimed call.")
_FIND_MAX = flags.DEFINE_bool("find_max", False, "Also find each model's longest context.")
_FIND_FROM = flags.DEFINE_integer("find_from", 0, "A context known to fit, the search doubles "
                                  "from it (0: the largest of --contexts).")
_MAX_RESOLUTION = flags.DEFINE_integer("max_resolution", 8192,
                                       "The search stops once success and failure are this close.")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", 0, "The search's upper end (0: the preset's "
                                    "max_position_embeddings).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights, prompts and sampling.")
_OVERRIDES = flags.DEFINE_list("model", [], "ModelConfig fields as name=value applied to the "
                               "hybrid (and so to its all-softmax twin), e.g. "
                               "lightning_impl=blockwise.")


def main(argv):
  del argv
  try:
    overrides = reporting.model_overrides(_OVERRIDES.value)
  except ValueError as e:
    raise app.UsageError(f"--model: {e}") from None
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "long_context.log"))
  log(reporting.versions())
  stats = jax.devices()[0].memory_stats() or {}
  log(f"XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}; "
      f"device memory limit {stats.get('bytes_limit', 0) / 2**30:.1f} GiB (0: not reported)")
  hybrid = config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value,
                         **overrides)
  models = long_context.all_models(hybrid)
  unknown = set(_MODELS.value) - set(models)
  if unknown:
    raise ValueError(f"--models: unknown {sorted(unknown)}; choose from {sorted(models)}")
  configs = {name: cfg for name, cfg in models.items() if name in _MODELS.value}
  contexts = [int(c) for c in _CONTEXTS.value]
  log(f"preset {_PRESET.value} ({hybrid.num_lightning_layers} lightning + "
      f"{hybrid.num_softmax_layers} softmax layers) vs all softmax; dtype {_DTYPE.value}; "
      f"batch {_BATCH.value}; {_NEW_TOKENS.value} new tokens; median of {_REPS.value} calls")

  if contexts:
    params = {name: model.init(cfg, jax.random.key(_SEED.value)) for name, cfg in configs.items()}
    write = lambda timings, log: reporting.write_results(
        _OUT_DIR.value, "long_context", timings, long_context.table(timings), log)
    # The files after each point (a run stopped by a time limit keeps them); the table once.
    timings, _ = long_context.time_contexts(configs, params, contexts, _BATCH.value,
                                            _NEW_TOKENS.value, _REPS.value, _SEED.value, log,
                                            on_point=lambda so_far: write(so_far, lambda _: None))
    del params
    long_context.free_device_memory()
    write(timings, log)

  if _FIND_MAX.value:
    results = []
    for name, cfg in configs.items():  # one model's params on the device at a time
      params = model.init(cfg, jax.random.key(_SEED.value))
      results.append(long_context.find_max(
          name, cfg, params, _BATCH.value, _NEW_TOKENS.value,
          _FIND_FROM.value or max(contexts, default=0), _MAX_RESOLUTION.value,
          _MAX_CONTEXT.value or hybrid.max_position_embeddings, _SEED.value, log))
      del params
      long_context.free_device_memory()
      log(long_context.max_table(results[-1:]))
      reporting.write_results(_OUT_DIR.value, "long_context_max", results,
                              long_context.max_table(results), lambda _: None)
    log(long_context.max_table(results))


if __name__ == "__main__":
  app.run(main)
