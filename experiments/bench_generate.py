r"""Decode speed vs context length: the hybrid model against an all-softmax twin, side by side.

For each context length, times --steps decode steps (median, after --warmup) of the --preset model
(7 lightning : 1 softmax) and of the same model with every layer softmax, both with random bf16
parameters and a cache filled with random values up to the context (experiments/benchmarks/
generate.py says why that times the step that follows a prefill). Prints a table with the fitted
slope (ms per 1K context) of each model and writes bench_generate.csv, bench_generate.png and
bench_generate.log to --out_dir.

  python -m experiments.bench_generate --out_dir=results/bench_generate
  # CPU smoke run:
  python -m experiments.bench_generate --preset=tiny --contexts=64,128 --batch=2 \
      --steps=2 --warmup=1 --out_dir=/tmp/bench_generate
"""

import os

from absl import app
from absl import flags

from experiments import reporting
from experiments.benchmarks import generate as benchmark
from m1jax import config

_OUT_DIR = flags.DEFINE_string("out_dir", os.environ.get("OUT", "results/bench_generate"),
                               "Folder for the CSV, plot and log.")
_PRESET = flags.DEFINE_string("preset", "small", "config.preset name of the hybrid model.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384", "32768",
                                           "65536"], "Context lengths (tokens already cached).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences decoded together.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed decode steps per point (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed decode steps per point before timing.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", sorted(config.DTYPES),
                           "Parameter, activation and KV cache dtype.")
_COMPILE_THREADS = flags.DEFINE_integer("compile_threads", 8, "Decode steps compiled at once.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random parameters and cache contents.")


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "bench_generate.log"))

  hybrid = config.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value)
  configs = {"hybrid": hybrid, "all_softmax": benchmark.all_softmax(hybrid)}
  log(reporting.versions())
  log(f"preset {_PRESET.value} ({hybrid.num_lightning_layers} lightning + "
      f"{hybrid.num_softmax_layers} softmax layers) vs all softmax; dtype {_DTYPE.value}; "
      f"batch {_BATCH.value}; {_STEPS.value} timed steps after {_WARMUP.value} warm-up")
  results = benchmark.run(configs, [int(c) for c in _CONTEXTS.value], _BATCH.value, _STEPS.value,
                          _WARMUP.value, _SEED.value, _COMPILE_THREADS.value, log=log)
  reporting.write_dataclass_csv(os.path.join(_OUT_DIR.value, "bench_generate.csv"), results)
  benchmark.plot(results, os.path.join(_OUT_DIR.value, "bench_generate.png"),
                 f"decode step, preset {_PRESET.value}, batch {_BATCH.value}, {_DTYPE.value}")
  log("\n" + benchmark.table(results))


if __name__ == "__main__":
  app.run(main)
