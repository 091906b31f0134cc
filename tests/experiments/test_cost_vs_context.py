"""End-to-end tests of experiments/figures/cost_vs_context.py on small synthetic benchmark CSVs
(the columns experiments/bench_lightning.py, experiments/bench_generate.py and
experiments/bench_long_context.py write)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

KERNEL_CSV = """\
kind,impl,batch,seq_len,heads,dim,ms,tflops,frac_peak,frac_hbm,fla_over_ours,rel_err,note
fwd,pallas,16,2048,16,128,0.25,200,0.25,0.5,1.5,0.003,
fwd,fla,16,2048,16,128,0.4,130,0.16,0.3,nan,0.003,
fwd,xla,16,2048,16,128,4.5,22,0.03,0.03,nan,0.003,
fwd,cudnn-softmax,16,2048,16,128,0.6,430,0.55,nan,nan,nan,
fwd+bwd,pallas,16,2048,16,128,0.75,235,0.3,0.45,2.2,nan,
fwd,pallas,4,8192,16,128,0.25,214,0.27,0.5,1.5,0.003,
fwd,fla,4,8192,16,128,0.375,137,0.17,0.33,nan,0.003,
fwd,cudnn-softmax,4,8192,16,128,2.0,530,0.66,nan,nan,nan,
fwd,pallas,16,2048,64,128,1.0,204,0.25,0.49,1.5,0.003,
fwd,cudnn-softmax,16,2048,64,128,2.5,430,0.55,nan,nan,nan,
decode,pallas,64,1,64,128,0.15,nan,nan,0.8,1.03,1.5e-05,
"""

GENERATE_CSV = """\
model,context,batch,ms_per_step,tokens_per_s,cache_mib,compile_s
hybrid,1024,8,5.0,1600,10,1.0
all_softmax,1024,8,5.5,1450,20,1.0
hybrid,3072,8,5.1,1570,12,1.0
all_softmax,3072,8,6.5,1230,60,1.0
"""

LONG_CONTEXT_CSV = """\
model,context,batch,new_tokens,prefill_s,ms_per_step,total_s,prefill_compile_s,compile_s,\
xla_estimate_gib,device_peak_gib,device_peak_here,kv_cache_gib,lightning_state_mib
hybrid,8192,1,1024,0.2,3.0,3.3,20,25,5.0,6.0,True,0.03,7.0
all_softmax,8192,1,1024,0.3,4.0,4.4,18,22,5.5,6.5,True,0.25,0.0
hybrid,32768,1,1024,0.8,3.3,4.2,20,25,6.0,7.0,True,0.13,7.0
all_softmax,32768,1,1024,1.5,7.0,8.7,18,22,8.0,9.0,True,1.0,0.0
"""


def _run(tmp_path, kernel_csv, generate_csv, *extra):
  out_png = tmp_path / "out" / "cost.png"
  command = [sys.executable, "-m", "experiments.figures.cost_vs_context",
             f"--kernel_csv={kernel_csv}", f"--generate_csv={generate_csv}",
             f"--out_png={out_png}", *extra]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return result, out_png


def _write_inputs(tmp_path, kernel=KERNEL_CSV, generate=GENERATE_CSV):
  (tmp_path / "kernel.csv").write_text(kernel)
  (tmp_path / "generate.csv").write_text(generate)
  return tmp_path / "kernel.csv", tmp_path / "generate.csv"


def test_plot_and_table_from_synthetic_csvs(tmp_path):
  kernel_csv, generate_csv = _write_inputs(tmp_path)
  result, out_png = _run(tmp_path, kernel_csv, generate_csv)
  assert result.returncode == 0, result.stderr
  assert out_png.stat().st_size > 10_000  # a rendered two-panel PNG, not an empty file
  table = out_png.with_suffix(".md").read_text()
  # Default heads: 16, the head count with two sequence lengths (64 has one). us/token =
  # 1000 ms / (B T): Pallas 0.25 ms / 32768 tokens = 0.007629; cuDNN at T 8192: 2 ms -> 0.06104.
  assert "16 heads" in table
  assert "| 2048 | 0.007629 | 0.01221 | 0.01831 |" in table
  assert "| 8192 | 0.007629 | 0.01144 | 0.06104 |" in table
  # Decode slopes per 1K context: hybrid (5.1 - 5.0) / 2 = 0.05; all-softmax (6.5 - 5.5) / 2 = 0.5.
  assert "| 1024 | 5 | 5.5 |" in table
  assert "| slope (ms per 1K context) | 0.05 | 0.5 |" in table
  assert "Prefill" not in table  # only with --long_context_csv
  assert table.strip() in result.stdout


def test_heads_flag_and_missing_series(tmp_path):
  kernel_csv, generate_csv = _write_inputs(tmp_path)
  result, out_png = _run(tmp_path, kernel_csv, generate_csv, "--heads=64")
  assert result.returncode == 0, result.stderr
  assert "| 2048 | 0.03052 | 0.07629 |" in out_png.with_suffix(".md").read_text()
  result, _ = _run(tmp_path, kernel_csv, generate_csv, "--kernel_kind=fwd+bwd")
  assert result.returncode != 0
  assert "no 'fwd+bwd' rows of impl 'cudnn-softmax' with 16 heads" in result.stderr


def test_missing_or_malformed_inputs_name_the_file_and_its_producer(tmp_path):
  kernel_csv, generate_csv = _write_inputs(tmp_path)
  result, _ = _run(tmp_path, tmp_path / "absent.csv", generate_csv)
  assert result.returncode != 0
  assert f"--kernel_csv={tmp_path / 'absent.csv'}: no such file" in result.stderr
  assert "experiments/bench_lightning.py" in result.stderr
  bad = tmp_path / "bad.csv"
  bad.write_text("model,context,batch\nhybrid,1024,8\n")
  result, _ = _run(tmp_path, kernel_csv, bad)
  assert result.returncode != 0
  assert "--generate_csv" in result.stderr and "'ms_per_step'" in result.stderr
  assert "experiments/bench_generate.py" in result.stderr


def test_long_context_csv_joins_or_replaces_the_bench_generate_series(tmp_path):
  kernel_csv, generate_csv = _write_inputs(tmp_path)
  long_csv = tmp_path / "long_context.csv"
  long_csv.write_text(LONG_CONTEXT_CSV)
  result, out_png = _run(tmp_path, kernel_csv, generate_csv, f"--long_context_csv={long_csv}")
  assert result.returncode == 0, result.stderr
  table = out_png.with_suffix(".md").read_text()
  # Both decode tables: bench_generate's as before, then the long-context one. Slopes per 1K:
  # hybrid (3.3 - 3.0) / 24 = 0.0125, all-softmax (7 - 4) / 24 = 0.125.
  assert "| slope (ms per 1K context) | 0.05 | 0.5 |" in table
  long_table = table.split("after a real prefill (bench_long_context):")[1]
  assert "| context | hybrid batch 1 (ms/step) | all_softmax batch 1 (ms/step) |" in long_table
  assert "| 8192 | 3 | 4 |" in long_table and "| 32768 | 3.3 | 7 |" in long_table
  assert "| slope (ms per 1K context) | 0.0125 | 0.125 |" in long_table
  # The prefill table: seconds per model and all-softmax / hybrid (0.3 / 0.2, 1.5 / 0.8).
  prefill_table = table.split("Prefill (prompt in, first token out)")[1].split("Decode step")[0]
  assert "| context | hybrid batch 1 (s) | all_softmax batch 1 (s) |" in prefill_table
  assert "| 8192 | 0.2 | 0.3 | 1.5 |" in prefill_table
  assert "| 32768 | 0.8 | 1.5 | 1.88 |" in prefill_table

  result, out_png = _run(tmp_path, kernel_csv, "", f"--long_context_csv={long_csv}")
  assert result.returncode == 0, result.stderr
  table = out_png.with_suffix(".md").read_text()
  assert "| 1024 |" not in table and "| 8192 | 3 | 4 |" in table
  result, _ = _run(tmp_path, kernel_csv, "")
  assert result.returncode != 0
  assert "--generate_csv and --long_context_csv are both empty" in result.stderr
  no_prefill = tmp_path / "no_prefill.csv"
  no_prefill.write_text("model,context,batch,ms_per_step\nhybrid,8192,1,3.0\n"
                        "all_softmax,8192,1,4.0\n")
  result, _ = _run(tmp_path, kernel_csv, "", f"--long_context_csv={no_prefill}")
  assert result.returncode != 0
  assert "--long_context_csv" in result.stderr and "'prefill_s'" in result.stderr
