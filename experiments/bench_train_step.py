r"""Sharded RL train step (rl_update) on several meshes: agreement with one device, tokens/s, MFU.

  python -m experiments.bench_train_step --out_dir=results/train_step   # all local GPUs

Meshes are given as `axis=size,...` separated by `;` (axes: data, fsdp, tensor, expert). Writes
train_step.csv and train_step.md to --out_dir.
"""

import os

from absl import app, flags

from experiments import reporting
from experiments.benchmarks import train_step as benchmark
from m1jax import config

_PRESET = flags.DEFINE_string("preset", "small", "config.preset name.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_MESHES = flags.DEFINE_string("meshes", "fsdp=1;fsdp=2;expert=2;data=2", "Meshes to time.")
_ROWS = flags.DEFINE_integer("rows", 16, "Sequences per step.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per sequence.")
_RESPONSE_LEN = flags.DEFINE_integer("response_len", 896, "Response tokens per sequence.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", reporting.PEAK_BF16_FLOPS / 1e12,
                                  "Per-device peak for MFU (default: the measured H200 bf16 "
                                  "matmul rate).")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/train_step", "CSV and table folder.")


def main(argv):
  del argv
  cfg = config.preset(_PRESET.value, dtype=_DTYPE.value)
  shapes = [dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in mesh.split(","))
            for mesh in _MESHES.value.split(";") if mesh]
  results = benchmark.run_meshes(cfg, shapes, _ROWS.value, _PROMPT_LEN.value, _RESPONSE_LEN.value,
                                 _PEAK_TFLOPS.value * 1e12)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  reporting.write_dataclass_csv(os.path.join(_OUT_DIR.value, "train_step.csv"), results)
  text = benchmark.table(results)
  with open(os.path.join(_OUT_DIR.value, "train_step.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
