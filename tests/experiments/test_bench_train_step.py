"""The train-step benchmark runs end to end on CPU at tiny sizes, with a ModelConfig variant
timed beside the base in the same process."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_step_benchmark_times_the_base_and_each_variant(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train_step", "--preset=tiny", "--dtype=float32",
       "--shapes=2x32", "--breakdown=false", "--variants=lm_head_grad_precision=highest",
       "--compiler_options=xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=false",
       "--head_precisions=highest,bf16_3x", "--head_logit_stds=0,20", f"--out_dir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "train_step.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == [
      "", "lm_head_grad_precision=highest",
      "xla:xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=False"]
  assert all(float(r["step_ms"]) > 0 for r in rows)
  assert all(0 < float(r["lower_s"]) < float(r["compile_s"]) for r in rows)
  # The variant changes only the backward's matmul algorithm (plain float32 on XLA:CPU), and
  # the GPU compiler options do nothing on CPU: the first step's loss and gradient norm are the
  # base's.
  assert all(r["loss"] == rows[0]["loss"] and r["grad_norm"] == rows[0]["grad_norm"]
             for r in rows)
  table = (tmp_path / "train_step.md").read_text()
  assert "| base | single |" in table and "| lm_head_grad_precision=highest | single |" in table
  with open(tmp_path / "head_precision.csv") as f:
    heads = list(csv.DictReader(f))
  assert [(r["precision"], r["logit_std"] == "20.0") for r in heads] == [
      ("highest", False), ("bf16_3x", False), ("highest", True), ("bf16_3x", True)]
  assert all(float(r["forward_ms"]) > 0 for r in heads)
  # XLA:CPU computes bf16_3x in plain float32: the same log-probs, bit for bit.
  assert all(float(r["max_abs_diff"]) == 0.0 for r in heads)
  assert "LM head + log-probs by lm_head_precision (log-probs against highest's)" in table


@pytest.mark.parametrize("flag, message", [
    ("--variants=lm_head_grad_precison=bf16_3x", "model override 'lm_head_grad_precison=bf16_3x'"),
    ("--head_precisions=highest,bf16_9x", "--head_precisions: unknown ['bf16_9x']"),
    ("--compiler_options=xla_gpu_autotune_levl=0",
     "No such compile option: 'xla_gpu_autotune_levl'"),
    ("--compiler_options=xla_gpu_autotune_level", "expected name=value"),
])
def test_a_misspelled_switch_stops_before_any_compile(tmp_path, flag, message):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train_step", "--preset=tiny", flag,
       f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.listdir(tmp_path)  # nothing written
