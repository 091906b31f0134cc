r"""Figure 1 (right): theoretical inference FLOPs vs generation length, ours next to the paper's.

Writes to --out_dir: fig1_flops.png (curves 0..--max_length), fig1_flops.csv (the curves),
fig1_tables.md (M1/R1 and M1/Qwen3 ratios, absolute FLOPs, quadratic fits, counting conventions),
and prints the tables. Counting: m1jax/flops.py; discussion: docs/figures.md.

  python -m experiments.figures.fig1_flops --out_dir=results/fig1
"""

import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import reporting  # noqa: E402
from m1jax import flops  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "results/fig1", "Folder for the PNG, CSV and tables.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 128 * 1024, "Largest generation length plotted.")
_NUM_POINTS = flags.DEFINE_integer("num_points", 257, "Points per curve (CSV rows).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "Prompt tokens before the generation "
                                   "(their attention is charged, their own forward is not).")

_LABELS = {"deepseek-r1": "DeepSeek-R1", "qwen3-235b-a22b": "Qwen3-235B-A22B",
           "minimax-m1": "MiniMax-M1"}
_COLORS = {"deepseek-r1": "tab:blue", "qwen3-235b-a22b": "tab:green", "minimax-m1": "tab:red"}
_NAIVE_MLA = flops.Counting(mla_form="naive")


def _length_labels():
  return [f"{length // 1024}K" for length in flops.PAPER_FIG1_LENGTHS]


def _ratio_table(archs, prompt_len):
  ours = flops.compare_with_paper(archs, prompt_len=prompt_len)
  naive = flops.compare_with_paper(archs, _NAIVE_MLA, prompt_len=prompt_len)
  rows = []
  for i, label in enumerate(_length_labels()):
    row = [label]
    for other in ("deepseek-r1", "qwen3-235b-a22b"):
      key = f"minimax-m1/{other}"
      row += [f"{ours[key][i]:.3f}", f"{ours['paper ' + key][i]:.3f}"]
    row.insert(3, f"{naive['minimax-m1/deepseek-r1'][i]:.3f}")
    rows.append(row)
  return reporting.markdown_table(["gen length", "M1/R1 ours (absorbed MLA)", "M1/R1 paper",
                    "M1/R1 ours (naive MLA)", "M1/Qwen3 ours", "M1/Qwen3 paper"], rows)


def _absolute_table(archs, prompt_len):
  ours = flops.compare_with_paper(archs, prompt_len=prompt_len)
  naive = flops.compare_with_paper(archs, _NAIVE_MLA, prompt_len=prompt_len)
  rows = []
  for name in flops.PAPER_FIG1_FLOPS:
    for label, values in (("ours", ours[name]), ("paper", flops.PAPER_FIG1_FLOPS[name])):
      rows.append([_LABELS[name], label] + [f"{v / 1e16:.3f}" for v in values])
    if name == "deepseek-r1":
      rows.append([_LABELS[name], "ours, naive MLA"] + [f"{v / 1e16:.3f}" for v in naive[name]])
  return reporting.markdown_table(["model", "count"] + _length_labels(), rows)


def _fit_table(archs):
  rows = []
  for name, (paper_a, paper_b) in flops.PAPER_FIG1_FITS.items():
    countings = [("default", flops.Counting())]
    if name == "deepseek-r1":
      countings.append(("naive MLA", _NAIVE_MLA))
    for label, counting in countings:
      a, b = flops.quadratic_fit(archs[name], counting)
      rows.append([_LABELS[name], label, f"{a:.4g}", f"{paper_a:.4g}", f"{paper_a / a:.3f}",
                   f"{b:.4g}", f"{paper_b:.4g}", f"{paper_b / b:.3f}"])
  return reporting.markdown_table(["model", "count", "a ours", "a paper", "paper/ours", "b ours", "b paper",
                    "paper/ours"], rows)


def _convention_table(archs, prompt_len):
  rows = []
  for label, counting in flops.CONVENTIONS.items():
    result = flops.compare_with_paper(archs, counting, prompt_len=prompt_len)
    log_errors = np.concatenate([np.log(result[name] / np.asarray(paper))
                                 for name, paper in flops.PAPER_FIG1_FLOPS.items()])
    rows.append([label]
                + [" / ".join(f"{r:.3f}" for r in result[f"minimax-m1/{other}"])
                   for other in ("deepseek-r1", "qwen3-235b-a22b")]
                + [f"{result[name][-1] / paper[-1]:.2f}"
                   for name, paper in flops.PAPER_FIG1_FLOPS.items()]
                + [f"{np.sqrt(np.mean(log_errors ** 2)):.3f}"])
  paper = flops.compare_with_paper(archs, prompt_len=prompt_len)
  rows.append(["paper (plotted)"]
              + [" / ".join(f"{r:.3f}" for r in paper[f"paper minimax-m1/{other}"])
                 for other in ("deepseek-r1", "qwen3-235b-a22b")] + ["1", "1", "1", "0"])
  lengths = ", ".join(_length_labels())
  return reporting.markdown_table(["counting", f"M1/R1 at {lengths}", f"M1/Qwen3 at {lengths}"]
                   + [f"{_LABELS[name]} ours/paper at 128K" for name in flops.PAPER_FIG1_FLOPS]
                   + ["RMS log error vs the 12 plotted values"], rows)


def _plot(archs, lengths, curves, path):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, arch in archs.items():
    color = _COLORS[name]
    ax.plot(lengths / 1024, curves[name] / 1e16, color=color, label=f"{_LABELS[name]} (ours)")
    paper_a, paper_b = flops.PAPER_FIG1_FITS[name]
    ax.plot(lengths / 1024, (paper_a * lengths + paper_b * lengths ** 2 / 2) / 1e16, color=color,
            linestyle=":", linewidth=1)
    ax.plot(np.asarray(flops.PAPER_FIG1_LENGTHS) / 1024,
            np.asarray(flops.PAPER_FIG1_FLOPS[name]) / 1e16, "o", color=color, markersize=4)
    if arch.count(flops.MLA):
      ax.plot(lengths / 1024, curves[f"{name} naive-mla"] / 1e16, color=color, linestyle="--",
              label=f"{_LABELS[name]} (ours, naive MLA)")
  ax.plot([], [], "k:o", linewidth=1, markersize=4, label="paper (read values, fitted curve)")
  ax.set_xlabel("generation length (K tokens)")
  ax.set_ylabel("cumulative inference FLOPs (x 1e16)")
  ax.set_title("Theoretical inference FLOPs vs generation length")
  ax.set_xlim(0, lengths[-1] / 1024)
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def main(argv):
  del argv
  out_dir, prompt_len = _OUT_DIR.value, _PROMPT_LEN.value
  os.makedirs(out_dir, exist_ok=True)
  archs = flops.figure1_archs()
  lengths = np.linspace(0, _MAX_LENGTH.value, _NUM_POINTS.value).round().astype(np.int64)
  curves = {name: flops.cumulative_flops(arch, lengths, prompt_len) for name, arch in archs.items()}
  curves.update({f"{name} naive-mla": flops.cumulative_flops(arch, lengths, prompt_len, _NAIVE_MLA)
                 for name, arch in archs.items() if arch.count(flops.MLA)})

  reporting.write_csv(os.path.join(out_dir, "fig1_flops.csv"), ["gen_length"] + list(curves),
                      [[int(length)] + [f"{curves[name][i]:.6e}" for name in curves]
                       for i, length in enumerate(lengths)])
  _plot(archs, lengths, curves, os.path.join(out_dir, "fig1_flops.png"))

  tables = "\n\n".join([
      f"Prompt length: {prompt_len}. FLOPs in units of 1e16 where not ratios.",
      "M1 FLOPs relative to the other models:\n\n" + _ratio_table(archs, prompt_len),
      "Cumulative FLOPs (x 1e16):\n\n" + _absolute_table(archs, prompt_len),
      "Quadratic fits FLOPs(L) = a L + b L^2 / 2 (ours are exact at prompt length 0):\n\n"
      + _fit_table(archs),
      "Counting conventions:\n\n" + _convention_table(archs, prompt_len),
  ])
  with open(os.path.join(out_dir, "fig1_tables.md"), "w") as f:
    f.write(tables + "\n")
  print(tables)
  print(f"\nWrote fig1_flops.png, fig1_flops.csv, fig1_tables.md to {out_dir}")


if __name__ == "__main__":
  app.run(main)
