"""The long-context benchmark's library code on CPU at tiny sizes, and its max-context search."""

import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import reporting
from experiments.benchmarks import long_context
from m1jax import config, generate, model

CONTEXT = 64
NEW_TOKENS = 4


def _out_of_memory():
  return jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")


def test_timed_points_give_one_row_each_and_the_tokens_of_a_plain_generate_call(tmp_path):
  # One context: every point compiles two generate programs, seconds each on CPU.
  hybrid = config.preset("tiny", num_hidden_layers=2, attn_type_list=(0, 1))
  configs = long_context.all_models(hybrid)
  assert configs["all_softmax"].attn_type_list == (1, 1)
  params = {name: model.init(cfg, jax.random.key(0)) for name, cfg in configs.items()}
  logged, seen = [], []
  timings, tokens = long_context.time_contexts(configs, params, [CONTEXT], 1, NEW_TOKENS,
                                               reps=1, log=logged.append,
                                               on_point=lambda so_far: seen.append(len(so_far)))
  assert seen == [1, 2]  # after every point, with the points so far
  assert [(t.model, t.context) for t in timings] == [("hybrid", CONTEXT),
                                                     ("all_softmax", CONTEXT)]
  assert len(logged) == 4  # a line before and after every point
  for t in timings:
    assert (t.batch, t.new_tokens) == (1, NEW_TOKENS)
    assert t.prefill_s > 0 and t.total_s > 0 and t.compile_s > 0 and t.prefill_compile_s > 0
    assert 0 < t.lower_s < t.compile_s
    assert t.xla_estimate_gib > 0
    assert t.device_peak_gib is None and t.device_peak_here is None  # CPU: no memory_stats
    cache = generate.cache_bytes(configs[t.model], 1, CONTEXT + NEW_TOKENS - 1)
    assert t.kv_cache_gib == cache.softmax / 2**30
    assert t.lightning_state_mib == cache.lightning / 2**20
  assert timings[1].lightning_state_mib == 0  # the twin has no lightning layer
  # The timing path changes no output: the same prompts, config and key through generate.
  for name, cfg in configs.items():
    plain = generate.generate(cfg, params[name], long_context.random_prompts(cfg, 1, CONTEXT),
                              long_context.generate_config(NEW_TOKENS), key=jax.random.key(0))
    np.testing.assert_array_equal(tokens[(name, CONTEXT)], plain.tokens)
    assert int(plain.lengths[0]) == NEW_TOKENS  # no EOS, no early truncation

  text = long_context.table(timings)
  assert [line.split(" | ")[:2] for line in text.splitlines()[2:]] == [
      ["| hybrid", str(CONTEXT)], ["| all_softmax", str(CONTEXT)]]
  assert "XLA estimate GiB (compiled program)" in text and "device peak GiB (memory_stats)" in text
  reporting.write_dataclass_csv(str(tmp_path / "long_context.csv"), timings)
  with open(tmp_path / "long_context.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["model"], int(r["context"])) for r in rows] == [("hybrid", CONTEXT),
                                                            ("all_softmax", CONTEXT)]
  assert all(r["device_peak_gib"] == "" for r in rows)  # left empty, not invented

  # The search's real attempt (compile and run the timed program) at its limit, which fits.
  result = long_context.find_max("hybrid", hybrid, params["hybrid"], 1, NEW_TOKENS,
                                 known_fit=CONTEXT // 2, resolution=16, limit=CONTEXT,
                                 log=logged.append)
  assert (result.max_context, result.first_failure, result.attempts) == (CONTEXT, None, "64 ok")
  assert result.kv_cache_gib == timings[0].kv_cache_gib
  assert "none (limit fits)" in long_context.max_table([result])


def _fits_below(limit: int, calls: list):
  def fits(context):
    calls.append(context)
    return context <= limit
  return fits


@pytest.mark.parametrize("known_fit", [0, 8192, 49152])
def test_search_doubles_then_bisects_to_the_resolution(known_fit):
  calls = []
  good, bad, attempts = long_context.find_max_context(_fits_below(50000, calls), known_fit,
                                                      resolution=8192, limit=1 << 20)
  assert good <= 50000 < bad and bad - good <= 8192
  assert [c for c, _ in attempts] == calls and all(ok == (c <= 50000) for c, ok in attempts)
  if known_fit == 8192:  # doubling 16K, 32K, 64K (fails), then 48K, 56K (fails)
    assert calls == [16384, 32768, 65536, 49152, 57344] and good == 49152


def test_search_stops_at_the_limit_and_reports_nothing_fitting():
  assert long_context.find_max_context(lambda c: True, 8192, 8192, 100000)[:2] == (100000, None)
  good, bad, attempts = long_context.find_max_context(lambda c: False, 0, 1024, 1 << 20)
  assert (good, bad, attempts) == (0, 1024, [(1024, False)])
  exact = long_context.find_max_context(_fits_below(5000, []), 0, 1, 1 << 20)
  assert exact[:2] == (5000, 5001)


def test_out_of_memory_is_a_failure_and_other_errors_propagate():
  def run_oom():
    raise _out_of_memory()
  assert long_context.fits_in_memory(lambda: None)
  assert not long_context.fits_in_memory(run_oom)

  def fits(context):
    if context > 50000:
      return long_context.fits_in_memory(run_oom)
    return long_context.fits_in_memory(lambda: None)
  assert long_context.find_max_context(fits, 8192, 8192, 1 << 20)[:2] == (49152, 57344)

  def run_internal():
    raise jax.errors.JaxRuntimeError("INTERNAL: cuDNN launch failure")
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    long_context.find_max_context(lambda c: long_context.fits_in_memory(run_internal), 0, 64, 512)

  def run_value_error():
    raise ValueError("not a memory error")
  with pytest.raises(ValueError, match="not a memory error"):
    long_context.fits_in_memory(run_value_error)


def test_a_misspelled_model_override_stops_before_anything_is_written(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_long_context", "--preset=tiny",
       "--model=lightning_impl=blockwise,moe_gemm_imp=xla", f"--out_dir={tmp_path / 'out'}"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "model override 'moe_gemm_imp=xla'" in result.stderr
  assert not os.listdir(tmp_path)


def test_the_script_writes_the_timed_points_and_each_model_s_search(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_long_context", "--preset=tiny", "--models=hybrid",
       f"--contexts={CONTEXT}", f"--new_tokens={NEW_TOKENS}", "--reps=1", "--find_max",
       f"--max_context={4 * CONTEXT}", f"--max_resolution={CONTEXT}", f"--out_dir={out}"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "long_context.csv", newline="") as f:
    timed = list(csv.DictReader(f))
  assert [(r["model"], int(r["context"])) for r in timed] == [("hybrid", CONTEXT)]
  with open(out / "long_context_max.csv", newline="") as f:
    (found,) = list(csv.DictReader(f))
  # Doubling from the timed context to the limit: 128 and 256 fit, so the limit itself is the max.
  assert (found["model"], int(found["max_context"]), found["first_failure"]) == (
      "hybrid", 4 * CONTEXT, "")
  assert found["attempts"] == f"{2 * CONTEXT} ok, {4 * CONTEXT} ok"
  log = (out / "long_context.log").read_text()
  assert f"context {4 * CONTEXT:>8d}: fits" in log
