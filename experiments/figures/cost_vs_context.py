r"""Cost vs context length: lightning against softmax attention, from the GPU benchmarks' CSVs.

Left: forward time per token (us) against sequence length T of one attention layer (H heads,
D = 128, bf16, B * T fixed): lightning attention (ours: the Pallas kernel; fla's Triton kernel)
against causal softmax attention (cuDNN flash attention), from experiments/bench_lightning.py.
Middle (with --long_context_csv): the whole model's prefill, prompt in and first token out,
against the prompt length, hybrid (7 lightning : 1 softmax) against its all-softmax twin, from
experiments/bench_long_context.py.
Right: decode step time (ms) against context length for the two models, with the fitted slope
of each: from experiments/bench_generate.py (a cache filled with random values) and, with
--long_context_csv, from experiments/bench_long_context.py (decoding after a real prefill of the
context, squares); either input may be left out (--generate_csv=''), not both.

Writes --out_png and, beside it, a markdown table of the plotted points (same name, .md).

  python -m experiments.figures.cost_vs_context \
      --kernel_csv=results/lightning/lightning_bench.csv \
      --generate_csv=results/bench_generate/bench_generate.csv \
      --out_png=results/cost_vs_context/cost_vs_context.png \
      --long_context_csv=results/long_context/long_context.csv
"""

import csv
import dataclasses
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import reporting  # noqa: E402
from experiments.benchmarks import generate as benchmark  # noqa: E402
from experiments.benchmarks import lightning as lightning_bench  # noqa: E402

_KERNEL_CSV = flags.DEFINE_string("kernel_csv", "results/lightning/lightning_bench.csv",
                                  "lightning_bench.csv of experiments/bench_lightning.py.")
_GENERATE_CSV = flags.DEFINE_string("generate_csv", "results/bench_generate/bench_generate.csv",
                                    "bench_generate.csv of experiments/bench_generate.py.")
_LONG_CONTEXT_CSV = flags.DEFINE_string(
    "long_context_csv", "", "long_context.csv of experiments/bench_long_context.py (optional).")
_OUT_PNG = flags.DEFINE_string("out_png", "results/cost_vs_context/cost_vs_context.png",
                               "Output figure (a .md table of the points is written beside it).")
_HEADS = flags.DEFINE_integer("heads", 0, "Kernel rows with this many heads (0: the head count "
                              "with the most sequence lengths, the largest on a tie).")
_KERNEL_KIND = flags.DEFINE_enum("kernel_kind", "fwd", ["fwd", "fwd+bwd"],
                                 "Kernel pass plotted on the left.")

_PRODUCERS = {
    "kernel_csv": ("experiments/bench_lightning.py "
                   "(`python -m experiments.bench_lightning --out_dir=results/lightning`)"),
    "generate_csv": ("experiments/bench_generate.py "
                     "(`python -m experiments.bench_generate --out_dir=results/bench_generate`)"),
    "long_context_csv": ("experiments/bench_long_context.py (`python -m "
                         "experiments.bench_long_context --out_dir=results/long_context`)"),
}
# Decode step inputs: flag -> (table title, legend suffix, marker).
_DECODE_SOURCES = {
    "generate_csv": ("Decode step against context", "", "o"),
    "long_context_csv": ("Decode step against context after a real prefill (bench_long_context)",
                         ", after a prefill", "s"),
}
# Kernel CSV impl -> (label, colour, line style); softmax dashed.
_KERNEL_SERIES = {
    "pallas": ("lightning, ours (Pallas)", "tab:red", "-"),
    "fla": ("lightning, fla (Triton)", "tab:orange", "-"),
    "cudnn-softmax": ("softmax, cuDNN flash attention", "tab:blue", "--"),
}
_PREFILL_TITLE = "Prefill (prompt in, first token out) against context (bench_long_context)"
_GENERATE_SERIES = {"hybrid": ("tab:red", "-"), "all_softmax": ("tab:blue", "--")}
_CASTS = {"int": int, "float": float, "str": str}


@dataclasses.dataclass(frozen=True)
class DecodePoint:
  """The decode columns both decode benchmarks' CSVs have (ms_per_step: one decode step)."""
  model: str
  context: int
  batch: int
  ms_per_step: float


@dataclasses.dataclass(frozen=True)
class PrefillPoint:
  """bench_long_context's prefill column (prefill_s: prompt in, first token out)."""
  model: str
  context: int
  batch: int
  prefill_s: float


def read_rows(path: str, row_type, flag: str) -> list:
  """The rows of a benchmark CSV as `row_type` dataclasses (columns cast by field type)."""
  if not os.path.exists(path):
    raise ValueError(f"--{flag}={path}: no such file; it is written by {_PRODUCERS[flag]} "
                     "on a GPU")
  fields = {f.name: _CASTS[f.type if isinstance(f.type, str) else f.type.__name__]
            for f in dataclasses.fields(row_type)}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [name for name in fields if name not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"--{flag}={path}: column(s) {missing} missing; expected the CSV written "
                       f"by {_PRODUCERS[flag]}")
    rows = [row_type(**{name: cast(row[name]) for name, cast in fields.items()}) for row in reader]
  if not rows:
    raise ValueError(f"--{flag}={path}: no rows")
  return rows


def kernel_series(rows, kind: str, heads: int) -> tuple[int, dict[str, list[tuple[int, float]]]]:
  """(heads used, {impl: [(T, us per token)]}) for the plotted impls.

  heads 0: the head count with the most distinct sequence lengths (the largest on a tie).
  """
  rows = [r for r in rows if r.kind == kind and r.impl in _KERNEL_SERIES]
  available = sorted({r.heads for r in rows})
  if not heads and available:
    heads = max(available, key=lambda h: (len({r.seq_len for r in rows if r.heads == h}), h))
  series = {}
  for impl in _KERNEL_SERIES:
    points = sorted((r.seq_len, 1e3 * r.ms / (r.batch * r.seq_len)) for r in rows
                    if r.impl == impl and r.heads == heads)
    if points:
      series[impl] = points
  for impl in ("pallas", "cudnn-softmax"):
    if impl not in series:
      raise ValueError(f"--kernel_csv: no {kind!r} rows of impl {impl!r} with {heads} heads "
                       f"(heads present: {available})")
  return heads, series


def model_series(rows, flag: str, field: str = "ms_per_step"
                 ) -> dict[tuple[str, int], list[tuple[int, float]]]:
  """{(model, batch): [(context, row.<field>)]}; needs hybrid and all_softmax rows."""
  series = {}
  for r in rows:
    series.setdefault((r.model, r.batch), []).append((r.context, getattr(r, field)))
  models = {name for name, _ in series}
  if not {"hybrid", "all_softmax"} <= models:
    raise ValueError(f"--{flag}: needs rows of models 'hybrid' and 'all_softmax'; found "
                     f"{sorted(models)}")
  return {key: sorted(points) for key, points in series.items()}


def _decode_table(series, rows) -> str:
  """Context by (model, batch) of ms per decode step, and the fitted slope of each."""
  contexts = sorted({c for points in series.values() for c, _ in points})
  by_model = {key: dict(points) for key, points in series.items()}
  return reporting.markdown_table(
      ["context"] + [f"{name} batch {batch} (ms/step)" for name, batch in series],
      [[c] + [f"{by_model[key][c]:.4g}" if c in by_model[key] else "-" for key in series]
       for c in contexts]
      + [["slope (ms per 1K context)"]
         + [f"{benchmark.slope_ms_per_1k([r for r in rows if r.batch == batch], name):.4g}"
            for name, batch in series]])


def _prefill_table(series) -> str:
  """Context by (model, batch) of prefill seconds, and all_softmax / hybrid at each batch."""
  contexts = sorted({c for points in series.values() for c, _ in points})
  by_model = {key: dict(points) for key, points in series.items()}
  batches = sorted({batch for name, batch in series
                    if {("hybrid", batch), ("all_softmax", batch)} <= set(series)})
  def ratio(c, batch):
    hybrid, twin = by_model[("hybrid", batch)], by_model[("all_softmax", batch)]
    return f"{twin[c] / hybrid[c]:.3g}" if c in hybrid and c in twin else "-"
  return reporting.markdown_table(
      ["context"] + [f"{name} batch {batch} (s)" for name, batch in series]
      + [f"all_softmax / hybrid, batch {batch}" for batch in batches],
      [[c] + [f"{by_model[key][c]:.4g}" if c in by_model[key] else "-" for key in series]
       + [ratio(c, batch) for batch in batches] for c in contexts])


def tables(kind, heads, kernel, decode, prefill=None) -> str:
  """decode: {flag: (series, rows)} of the decode inputs given; prefill: its series or None."""
  lengths = sorted({t for points in kernel.values() for t, _ in points})
  by_impl = {impl: dict(points) for impl, points in kernel.items()}
  kernel_table = reporting.markdown_table(
      ["T"] + [f"{_KERNEL_SERIES[impl][0]} (us/token)" for impl in kernel],
      [[t] + [f"{by_impl[impl][t]:.4g}" if t in by_impl[impl] else "-" for impl in kernel]
       for t in lengths])
  return "\n\n".join(
      [f"Attention kernel, {kind}, {heads} heads, time per token:\n\n{kernel_table}"]
      + ([f"{_PREFILL_TITLE}:\n\n{_prefill_table(prefill)}"] if prefill else [])
      + [f"{_DECODE_SOURCES[flag][0]}:\n\n{_decode_table(series, rows)}"
         for flag, (series, rows) in decode.items()])


def plot(kind, heads, kernel, decode, kernel_rows, path: str, prefill=None) -> None:
  fig, axes = plt.subplots(1, 3 if prefill else 2, figsize=(18 if prefill else 12, 4.8))
  left, right = axes[0], axes[-1]
  for impl, points in kernel.items():
    label, color, style = _KERNEL_SERIES[impl]
    left.plot(*zip(*points), marker="o", color=color, linestyle=style, label=label)
  shape = next(r for r in kernel_rows if r.kind == kind and r.heads == heads)
  left.set(yscale="log", xlabel="sequence length T (tokens)",
           ylabel="time per token (us)",
           title=f"one attention layer, {kind}: H={heads}, D={shape.dim}, "
                 f"B*T={shape.batch * shape.seq_len}")
  left.set_xscale("log", base=2)
  for flag, (series, rows) in decode.items():
    _, suffix, marker = _DECODE_SOURCES[flag]
    for (name, batch), points in series.items():
      color, style = _GENERATE_SERIES.get(name, ("tab:gray", ":"))
      slope = benchmark.slope_ms_per_1k([r for r in rows if r.batch == batch], name)
      right.plot(*zip(*points), marker=marker, color=color, linestyle=style,
                 label=f"{name}, batch {batch}{suffix} ({slope:.3g} ms per 1K context)")
  right.set(xlabel="context length (tokens)", ylabel="decode step (ms)",
            title="whole model, one decode step")
  right.set_xscale("log", base=2)
  right.set_ylim(bottom=0)
  if prefill:
    middle = axes[1]
    for (name, batch), points in prefill.items():
      color, style = _GENERATE_SERIES.get(name, ("tab:gray", ":"))
      label = f"{name}, batch {batch}"
      hybrid = dict(prefill.get(("hybrid", batch), []))
      common = [c for c, _ in points if c in hybrid]
      if name != "hybrid" and common:
        longest = max(common)
        label += f" ({dict(points)[longest] / hybrid[longest]:.3g}x the hybrid at {longest})"
      middle.plot(*zip(*points), marker="s", color=color, linestyle=style, label=label)
    middle.set(xscale="log", yscale="log", xlabel="prompt length (tokens)",
               ylabel="prefill, prompt in to first token (s)",
               title="whole model, prefill (bench_long_context)")
    middle.set_xscale("log", base=2)
  for ax in axes:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Lightning vs softmax attention: cost as the context grows")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=150)
  plt.close(fig)


def main(argv):
  del argv
  paths = {"generate_csv": _GENERATE_CSV.value, "long_context_csv": _LONG_CONTEXT_CSV.value}
  if not any(paths.values()):
    raise ValueError("--generate_csv and --long_context_csv are both empty: the right panel "
                     "needs one of them")
  kernel_rows = read_rows(_KERNEL_CSV.value, lightning_bench.Row, "kernel_csv")
  decode = {}
  for flag, path in paths.items():
    if path:
      rows = read_rows(path, DecodePoint, flag)
      decode[flag] = (model_series(rows, flag), rows)
  prefill = None
  if paths["long_context_csv"]:
    prefill = model_series(read_rows(paths["long_context_csv"], PrefillPoint, "long_context_csv"),
                           "long_context_csv", "prefill_s")
  heads, kernel = kernel_series(kernel_rows, _KERNEL_KIND.value, _HEADS.value)
  plot(_KERNEL_KIND.value, heads, kernel, decode, kernel_rows, _OUT_PNG.value, prefill)
  text = tables(_KERNEL_KIND.value, heads, kernel, decode, prefill)
  with open(os.path.splitext(_OUT_PNG.value)[0] + ".md", "w") as f:
    f.write(text + "\n")
  print(text)
  print(f"\nWrote {_OUT_PNG.value}")


if __name__ == "__main__":
  app.run(main)
