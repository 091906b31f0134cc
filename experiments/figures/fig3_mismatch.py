r"""Figure 3: per-token probability, sampler (incremental decode) vs trainer (full forward).

Samples --batch rows of --max_new_tokens tokens after random-token prompts with m1jax.generate,
then scores the same tokens the sampler's way (prefill + one-token decode steps) and the trainer's
way (one teacher-forced forward), with a bfloat16 and a float32 LM head, each with the trainer's
own MoE routing and with routing replay (the sampler's experts); also the hidden-state
difference of every layer and the share of tokens routed differently. Method:
m1jax/analysis/mismatch.py; discussion: docs/figures.md.

Writes to --out_dir: fig3_mismatch.png (scatter per arm: LM-head dtype x routing),
fig3_layers.png, fig3_pairs.csv, fig3_summary.csv, fig3_layers.csv, fig3_tables.md; prints the
tables.

  # GPU (one H200, several minutes, mostly compilation): small preset, random weights, LM head
  # rescaled (--logit_std).
  python -m experiments.figures.fig3_mismatch --out_dir=results/fig3
  # A trained model instead: --params_from=<workdir>/rl (experiments/train.py) or --hf_dir=DIR.
  # CPU smoke run:
  python -m experiments.figures.fig3_mismatch --preset=tiny --batch=4 --prompt_len=16 \
      --max_new_tokens=32 --out_dir=/tmp/fig3
"""

import datetime
import time

from absl import app
from absl import flags
import jax

from m1jax import config
from m1jax.analysis import mismatch

_OUT_DIR = flags.DEFINE_string("out_dir", "results/fig3", "Folder for the PNGs, CSVs and tables.")
_PRESET = flags.DEFINE_string("preset", "small", "config.preset of the random-weight model.")
_HF_DIR = flags.DEFINE_string("hf_dir", "", "A HF checkpoint (convert.save_hf) instead of random "
                              "weights.")
_PARAMS_FROM = flags.DEFINE_string("params_from", "", "A training stage directory "
                                   "(<workdir>/sft or <workdir>/rl) instead of random weights.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", sorted(config.DTYPES),
                           "Compute dtype of sampler and trainer.")
_LOGIT_STD = flags.DEFINE_float(
    "logit_std", None, "Random weights only: scale the LM head so that logits have this standard "
    f"deviation (default {mismatch.DEFAULT_LOGIT_STD}); a random head gives near-uniform "
    "next-token distributions.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sampled rows.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Random prompt tokens per row.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Tokens sampled per row.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_SAMPLE_HEAD_DTYPE = flags.DEFINE_enum("sample_head_dtype", "float32", mismatch.HEAD_DTYPES,
                                       "LM-head dtype of the sampling pass.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights, prompts and sampling.")


def main(argv):
  del argv
  start = time.perf_counter()
  cfg, params, weights = mismatch.load_model(
      preset=_PRESET.value, dtype=_DTYPE.value, hf_dir=_HF_DIR.value,
      params_from=_PARAMS_FROM.value, logit_std=_LOGIT_STD.value, seed=_SEED.value)
  prompt_key, sample_key = jax.random.split(jax.random.key(_SEED.value + 1))
  prompts = mismatch.random_prompts(cfg.vocab_size, _BATCH.value, _PROMPT_LEN.value, prompt_key)
  result = mismatch.measure(cfg, params, prompts, key=sample_key,
                            max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                            sample_head_dtype=_SAMPLE_HEAD_DTYPE.value)
  elapsed = time.perf_counter() - start
  description = (
      f"{datetime.date.today()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
      f"{_PRESET.value if not (_HF_DIR.value or _PARAMS_FROM.value) else 'model'} "
      f"({cfg.num_lightning_layers} lightning + {cfg.num_softmax_layers} softmax layers, "
      f"V {cfg.vocab_size}), {weights}; compute {cfg.dtype}; {_BATCH.value} rows x "
      f"{_MAX_NEW_TOKENS.value} tokens after {_PROMPT_LEN.value} random prompt tokens, "
      f"temperature {_TEMPERATURE.value:g}, sampled with a {_SAMPLE_HEAD_DTYPE.value} LM head; "
      f"{cfg.num_local_experts} experts, top {cfg.num_experts_per_tok}; {elapsed:.0f} s.")
  print(mismatch.write_report(result, _OUT_DIR.value, description))
  print(f"\nWrote fig3_mismatch.png, fig3_layers.png, fig3_pairs.csv, fig3_summary.csv, "
        f"fig3_layers.csv, fig3_tables.md to {_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)
