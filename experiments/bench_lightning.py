r"""Lightning attention kernels on one GPU: Pallas vs fla (Triton) vs XLA vs cuDNN softmax.

Prints a table, writes lightning_bench.csv, lightning_bench.png and lightning_bench.log to
--out_dir. Shapes: B*T = 32768 tokens, T in --seq_lens, H in --heads, D = 128, bf16; decode at
--decode_batches with H = 64. With --sweep, a few kernel tilings are timed on the forward first
and the fastest is used for the tables.

  PYTHONPATH=. python experiments/bench_lightning.py --out_dir=results/lightning
"""

import datetime
import os
import platform

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from pallas_kernels import lightning_bench as bench  # noqa: E402
from pallas_kernels.lightning_attention import DEFAULT_CONFIG  # noqa: E402
from pallas_kernels.lightning_attention import KernelConfig  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", os.environ.get("OUT", "results/lightning"),
                               "Folder for the CSV, plot and log.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192", "32768"], "T values (B = 32768 / T).")
_HEADS = flags.DEFINE_list("heads", ["16", "64"], "Head counts.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["64", "128", "256", "512"],
                                    "Decode batch sizes (H = 64, D = 128).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Time candidate tilings on the forward (H = 16, "
                           "T = 2K, 8K, 32K) first and use the fastest.")
_CONFIG = flags.DEFINE_list("config", [], "Kernel tiling block_size,value_tile,num_warps,"
                            "num_stages,min_programs[,state_block_size] (default: DEFAULT_CONFIG).")
_FLA = flags.DEFINE_bool("fla", True, "Include fla (needs torch + fla-core).")
_XLA = flags.DEFINE_bool("xla", True, "Include the jnp blockwise path.")
_CUDNN = flags.DEFINE_bool("cudnn", True, "Include cuDNN causal softmax attention.")

_DIM = 128
_TOKENS = 32768
# (block_size, value_tile, num_warps, num_stages, min_programs) candidates for the sweep;
# min_programs=1 never splits the sequence (one program per value tile and (batch, head)).
_TILINGS = [(64, 64, 4, 3, 128), (64, 64, 4, 4, 128), (64, 64, 4, 2, 128), (64, 64, 4, 3, 256),
            (64, 64, 4, 3, 512), (64, 64, 4, 3, 1)]


def _versions() -> str:
  parts = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
  for name in ("jaxlib", "torch", "triton", "fla"):
    try:
      module = __import__(name)
      parts.append(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError:
      parts.append(f"{name} absent")
  return ", ".join(parts)


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log_file = open(os.path.join(_OUT_DIR.value, "lightning_bench.log"), "a")

  def log(msg: str):
    print(msg, flush=True)
    log_file.write(msg + "\n")
    log_file.flush()

  log(f"date {datetime.date.today()}; device {jax.devices()[0].device_kind}; {_versions()}")
  seq_lens = [int(t) for t in _SEQ_LENS.value]
  shapes = [(_TOKENS // t, t, int(h), _DIM) for h in _HEADS.value for t in seq_lens]

  config = DEFAULT_CONFIG
  if _CONFIG.value:
    block, tile, warps, stages, min_programs, *state_block = (int(x) for x in _CONFIG.value)
    config = KernelConfig(block_size=block, value_tile=tile, num_warps=warps, num_stages=stages,
                          min_programs=min_programs,
                          state_block_size=state_block[0] if state_block else block)
  if _SWEEP.value:
    sweep_shapes = [(_TOKENS // t, t, 16, _DIM) for t in (2048, 8192, 32768)]
    candidates = [KernelConfig(block_size=c, value_tile=vt, num_warps=w, num_stages=st,
                               min_programs=p) for c, vt, w, st, p in _TILINGS]
    totals = bench.sweep_forward(candidates, sweep_shapes, log)
    config = min(totals, key=totals.get)
    for c, total in sorted(totals.items(), key=lambda kv: kv[1]):
      log(f"sweep total {total:8.4f} ms  {c}")
  log(f"kernel config: {config}")

  csv_path = os.path.join(_OUT_DIR.value, "lightning_bench.csv")
  rows = []
  for shape in shapes:  # The CSV is rewritten after each case, so a cut-short run keeps its rows.
    rows += bench.bench_prefill(config, [shape], log, with_fla=_FLA.value, with_xla=_XLA.value,
                                with_cudnn=_CUDNN.value)
    bench.write_csv(rows, csv_path)
  for batch in [int(b) for b in _DECODE_BATCHES.value]:
    rows += bench.bench_decode([batch], 64, _DIM, log, with_fla=_FLA.value)
    bench.write_csv(rows, csv_path)
  bench.plot(rows, os.path.join(_OUT_DIR.value, "lightning_bench.png"))
  log(f"\nkernel config: {config}")
  log(bench.markdown_table(rows))
  log_file.close()


if __name__ == "__main__":
  app.run(main)
