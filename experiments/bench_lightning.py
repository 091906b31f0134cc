r"""Lightning attention kernels on one GPU: Pallas vs fla (Triton) vs XLA vs cuDNN softmax.

Prints a table, writes lightning_bench.csv, lightning_bench.png and lightning_bench.log to
--out_dir. Shapes: B*T = 32768 tokens, T in --seq_lens, H in --heads, D = 128, bf16; decode at
--decode_batches with H = 64. With --sweep, the pre-pass variants in _CANDIDATES are timed first
(forward and forward + backward, B = 1, T = 32K, H = 16) and the fastest is used for the tables.

  python -m experiments.bench_lightning --out_dir=results/lightning
"""

import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import reporting  # noqa: E402
from experiments.benchmarks import lightning as bench  # noqa: E402
from pallas_kernels import DEFAULT_CONFIG, KernelConfig  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", os.environ.get("OUT", "results/lightning"),
                               "Folder for the CSV, plot and log.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192", "32768"], "T values (B = 32768 / T).")
_HEADS = flags.DEFINE_list("heads", ["16", "64"], "Head counts.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["64", "128", "256", "512"],
                                    "Decode batch sizes (H = 64, D = 128).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Time the pre-pass variants of _CANDIDATES (forward "
                           "and forward + backward at B = 1, T = 32K, H = 16) first and use the "
                           "fastest.")
_CONFIG = flags.DEFINE_list("config", [], "KernelConfig fields as name=value, e.g. "
                            "state_split=4,state_block_size=128 (default: DEFAULT_CONFIG).")
_FLA = flags.DEFINE_bool("fla", True, "Include fla (needs torch + fla-core).")
_XLA = flags.DEFINE_bool("xla", True, "Include the jnp blockwise path.")
_CUDNN = flags.DEFINE_bool("cudnn", True, "Include cuDNN causal softmax attention.")

_DIM = 128
_TOKENS = 32768
# Candidates for --sweep. They differ only in the pre-pass that runs when the sequence is split
# into segments (few (batch, head) pairs), so one such shape decides between them; tilings of the
# sweep kernel itself were chosen in earlier runs (docs/kernel_notes.md).
_CANDIDATES = [DEFAULT_CONFIG] + [
    dataclasses.replace(DEFAULT_CONFIG, **fields) for fields in (
        dict(state_split=1, state_block_size=128),
        dict(state_split=1, state_block_size=128, state_num_stages=3),
        dict(state_split=2, state_block_size=64),
        dict(state_split=4, state_block_size=64),
        dict(state_split=8, state_block_size=64),
        dict(state_split=4, state_block_size=128),
        dict(state_split=8, state_block_size=128),
    )]
_SWEEP_SHAPES = [(1, 32768, 16, _DIM)]


def _parse_config(items: list[str]) -> KernelConfig:
  """name=value pairs over DEFAULT_CONFIG (values as Python literals, else strings:
  state_split=4, segment_len=None, backward_impl=mosaic)."""
  try:
    overrides = reporting.model_overrides([f"lightning_kernel.{item}" for item in items])
  except ValueError as e:
    raise app.UsageError(f"--config: {e}") from e
  return overrides.get("lightning_kernel", DEFAULT_CONFIG)


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "lightning_bench.log"))

  log(reporting.versions("jaxlib", "torch", "triton", "fla"))
  seq_lens = [int(t) for t in _SEQ_LENS.value]
  shapes = [(_TOKENS // t, t, int(h), _DIM) for h in _HEADS.value for t in seq_lens]

  config = _parse_config(_CONFIG.value)
  if _SWEEP.value:
    relative = bench.sweep(_CANDIDATES, _SWEEP_SHAPES, log)
    config = min(relative, key=relative.get)
    for c, rel in sorted(relative.items(), key=lambda kv: kv[1]):
      log(f"sweep time / default's {rel:6.3f}  {c}")
  log(f"kernel config: {config}")

  csv_path = os.path.join(_OUT_DIR.value, "lightning_bench.csv")
  rows = []
  for shape in shapes:  # The CSV is rewritten after each case, so a cut-short run keeps its rows.
    rows += bench.bench_prefill(config, [shape], log, with_fla=_FLA.value, with_xla=_XLA.value,
                                with_cudnn=_CUDNN.value)
    reporting.write_dataclass_csv(csv_path, rows)
  for batch in [int(b) for b in _DECODE_BATCHES.value]:
    rows += bench.bench_decode([batch], 64, _DIM, log, with_fla=_FLA.value)
    reporting.write_dataclass_csv(csv_path, rows)
  bench.plot(rows, os.path.join(_OUT_DIR.value, "lightning_bench.png"))
  log(f"\nkernel config: {config}")
  log(bench.markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
