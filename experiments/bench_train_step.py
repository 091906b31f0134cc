r"""The RL train step (rl_update): time, tokens/s, MFU, peak memory, compile time, where the time
goes, and the same step on longer sequences and several meshes.

  python -m experiments.bench_train_step --out_dir=results/train_step   # one GPU
  python -m experiments.bench_train_step --meshes="fsdp=1;fsdp=2;expert=2" --breakdown=false

--shapes lists rows x tokens per step (each sequence 1/8 prompt, 7/8 response); the first shape
gets the component breakdown and the grouped-GEMM rates, and --variants (ModelConfig switches
timed beside the base on the first shape and mesh), and --compiler_options (sets of XLA
options, each timed beside the base the same way, e.g. to weigh compile time against step time:
"xla_gpu_autotune_level=0;xla_gpu_enable_triton_gemm=false"). --long_remat applies to shapes of more
than 4096 tokens per sequence. Meshes are `axis=size,...` separated by `;` (axes: data, fsdp,
tensor, expert). --head_precisions times the trainer's LM head + log-probs under each
lm_head_precision on the first shape's hidden states and compares the log-probs of sampled
tokens with the first one's, at each of --head_logit_stds:

  python -m experiments.bench_train_step --breakdown=false --head_precisions=highest,bf16_3x,bf16_6x

Writes train_step.csv, components.csv, head_precision.csv and train_step.md to --out_dir.
"""

import os

from absl import app, flags
import jax

from experiments import reporting
from experiments.benchmarks import train_step as benchmark
from m1jax import config, model

_PRESET = flags.DEFINE_string("preset", "small", "config.preset name.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_MESHES = flags.DEFINE_string("meshes", "fsdp=1", "Meshes to time (the first shape only).")
_SHAPES = flags.DEFINE_list("shapes", ["16x1024"], "rows x tokens per sequence, e.g. 4x8192.")
_LONG_REMAT = flags.DEFINE_string("long_remat", "save_matmuls",
                                  "remat_policy for sequences > 4096 tokens.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "Time the components of the first shape.")
_OVERRIDES = flags.DEFINE_list("model", [], "ModelConfig fields as name=value (e.g. "
                               "moe_gemm_impl=xla), applied to every run.")
_VARIANTS = flags.DEFINE_string(
    "variants", "", "';'-separated ModelConfig changes, each ','-separated name=value (e.g. "
    "\"lm_head_grad_precision=bf16_3x;remat_policy=dots_saveable\"), each timed after the base "
    "on the first shape and mesh, in the same process.")
_COMPILER_OPTIONS = flags.DEFINE_string(
    "compiler_options", "", "';'-separated sets of XLA compiler options, each ','-separated "
    "name=value, each timed after the base on the first shape and mesh (label xla:...).")
_HEAD_PRECISIONS = flags.DEFINE_list(
    "head_precisions", [], "lm_head_precision values to time and compare against the first "
    "(e.g. highest,bf16_3x), on the first shape; empty: none.")
_HEAD_LOGIT_STDS = flags.DEFINE_list(
    "head_logit_stds", ["0", "20", "60"], "Logit standard deviations the head is scaled to for "
    "--head_precisions (0: the initialised head as it is).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", reporting.PEAK_BF16_FLOPS / 1e12,
                                  "Per-device peak for MFU (default: the measured H200 bf16 "
                                  "matmul rate).")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/train_step", "CSV and table folder.")


def main(argv):
  del argv
  variants = reporting.model_variants(_VARIANTS.value)  # a misspelled field stops here
  try:
    option_sets = reporting.compiler_option_sets(_COMPILER_OPTIONS.value)
  except ValueError as e:
    raise app.UsageError(f"--compiler_options: {e}") from None
  unknown = sorted(set(_HEAD_PRECISIONS.value) - set(config.LM_HEAD_PRECISIONS))
  if unknown:
    raise app.UsageError(f"--head_precisions: unknown {unknown}; choose from "
                         f"{config.LM_HEAD_PRECISIONS}")
  logit_stds = [float(x) for x in _HEAD_LOGIT_STDS.value]
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "train_step.log"))
  log(reporting.versions())
  base = config.preset(_PRESET.value, dtype=_DTYPE.value,
                       **reporting.model_overrides(_OVERRIDES.value))
  params = model.init(base, jax.random.key(0))
  meshes = [dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in mesh.split(","))
            for mesh in _MESHES.value.split(";") if mesh]
  results, text = [], []
  for i, shape in enumerate(_SHAPES.value):
    rows, seq_len = (int(x) for x in shape.split("x"))
    cfg = base.replace(remat_policy=_LONG_REMAT.value) if seq_len > 4096 else base
    batch = benchmark.rollout_batch(cfg, rows, seq_len // 8, seq_len - seq_len // 8)
    for mesh in meshes if i == 0 else meshes[:1]:
      size = 1
      for n in mesh.values():
        size *= n
      first = i == 0 and mesh == meshes[0]
      variant_list = ([({}, {})] + [(changes, {}) for changes in variants if first]
                      + [({}, options) for options in option_sets if first])
      for changes, options in variant_list:
        label = reporting.describe_overrides(changes) or (
            "xla:" + reporting.describe_overrides(options) if options else "")
        result = benchmark.time_step(cfg.replace(**changes), params, batch, mesh,
                                     jax.devices()[:size], _PEAK_TFLOPS.value * 1e12,
                                     variant=label, compiler_options=options)
        log(f"{shape} {result.mesh} {label or 'base'}: {result.step_ms:.1f} ms, "
            f"{result.tokens_per_s:.0f} tokens/s, MFU {100 * result.mfu:.1f}%, compile "
            f"{result.compile_s:.1f} s (lower {result.lower_s:.1f}), peak "
            f"{result.peak_gib:.1f} GiB (remat "
            f"{cfg.replace(**changes).remat_policy})")
        results.append(result)
        reporting.write_dataclass_csv(os.path.join(_OUT_DIR.value, "train_step.csv"), results)
    if i == 0 and _BREAKDOWN.value:
      components = benchmark.component_times(cfg, params, rows, seq_len,
                                             seq_len - seq_len // 8)
      reporting.write_dataclass_csv(os.path.join(_OUT_DIR.value, "components.csv"), components)
      rates = benchmark.grouped_gemm_rates(cfg, rows, seq_len)
      text.append(benchmark.component_table(components, results[0].step_ms))
      text.append("grouped GEMMs alone (forward + both gradients, balanced experts): "
                  + ", ".join(f"{k} {v:.0f} TF/s" for k, v in rates.items()))
      log(text[-2] + "\n" + text[-1])
    if i == 0 and _HEAD_PRECISIONS.value:
      heads = benchmark.head_precisions(cfg, params, rows, seq_len, _HEAD_PRECISIONS.value,
                                        logit_stds)
      reporting.write_dataclass_csv(os.path.join(_OUT_DIR.value, "head_precision.csv"), heads)
      text.append(f"LM head + log-probs by lm_head_precision (log-probs against "
                  f"{_HEAD_PRECISIONS.value[0]}'s):\n\n" + benchmark.head_precision_table(heads))
      log(text[-1])
  text.insert(0, benchmark.table(results))
  with open(os.path.join(_OUT_DIR.value, "train_step.md"), "w") as f:
    f.write("\n\n".join(text) + "\n")
  log("\n\n".join(text))


if __name__ == "__main__":
  app.run(main)
