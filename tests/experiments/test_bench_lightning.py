"""bench_lightning's command line: --config takes every KernelConfig field, strings included."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_config_parses_strings_literals_and_none():
  result = _python("-c", (
      "from experiments import bench_lightning as b\n"
      "c = b._parse_config(['backward_impl=mosaic', 'state_split=4', 'segment_len=None'])\n"
      "print(c.backward_impl, c.state_split, c.segment_len, c.forward_impl)\n"
      "print(b._parse_config([]) == b.DEFAULT_CONFIG)\n"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["mosaic", "4", "None", "auto", "True"]


def test_config_rejects_unknown_fields_before_timing(tmp_path):
  result = _python("-m", "experiments.bench_lightning", "--config=backward=mosaic",
                   f"--out_dir={tmp_path}", "--seq_lens=", "--heads=", "--decode_batches=")
  assert result.returncode != 0
  assert "lightning_kernel.backward=mosaic" in result.stderr
  assert "backward_impl" in result.stderr  # the fields it takes are listed
