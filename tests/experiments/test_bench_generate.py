"""The decode benchmark's library code runs end to end on CPU at tiny sizes."""

import csv
import math

import jax
import numpy as np

from experiments import reporting
from experiments.benchmarks import generate as benchmark
from m1jax import config, generate, model


def test_filled_cache_marks_exactly_the_context_slots():
  cfg = config.preset("tiny")
  cache = benchmark.filled_cache(cfg, 2, 5, 9, jax.random.key(0))  # batch, context, length
  assert int(cache.index) == 5
  np.testing.assert_array_equal(cache.slot_mask, np.arange(9)[None].repeat(2, 0) < 5)
  for kv in (np.asarray(cache.keys), np.asarray(cache.values)):
    assert np.all(kv[:, :, :5] != 0) and np.all(kv[:, :, 5:] == 0)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == jax.tree.map(
      lambda x: (x.shape, x.dtype), model.init_cache(cfg, 2, 9))


def test_benchmark_runs_and_writes_table_csv_and_plot(tmp_path):
  hybrid = config.preset("tiny", num_hidden_layers=2, attn_type_list=(0, 1), dtype="bfloat16",
                         param_dtype="bfloat16")
  configs = {"hybrid": hybrid, "all_softmax": benchmark.all_softmax(hybrid)}
  assert configs["all_softmax"].attn_type_list == (1, 1)
  logged = []
  results = benchmark.run(configs, [8], batch=2, steps=2, warmup=1, compile_threads=2,
                          log=logged.append)
  assert [(r.model, r.context) for r in results] == [("hybrid", 8), ("all_softmax", 8)]
  assert len(logged) == 3  # the compile line, then one line per point
  assert all(r.ms_per_step > 0 and r.compile_s > 0 for r in results)
  assert all(math.isclose(r.tokens_per_s, 2e3 / r.ms_per_step) for r in results)
  for r in results:  # the cache holds context + warmup + steps = 11 slots
    assert r.cache_mib == generate.cache_bytes(configs[r.model], 2, 11).total / 2**20
  text = benchmark.table(results)
  assert "slope (ms per 1K context)" in text and len(text.splitlines()) == 3
  reporting.write_dataclass_csv(str(tmp_path / "bench.csv"), results)
  with open(tmp_path / "bench.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["model"], int(r["context"])) for r in rows] == [("hybrid", 8), ("all_softmax", 8)]
  benchmark.plot(results, str(tmp_path / "bench.png"), "tiny")
  assert (tmp_path / "bench.png").stat().st_size > 1000


def test_slope_is_the_least_squares_fit_in_ms_per_1k():
  timing = lambda name, context, ms: benchmark.DecodeTiming(name, context, 1, ms, 1e3 / ms, 0, 0)
  results = [timing("a", 1024, 2.0), timing("a", 2048, 2.5), timing("a", 4096, 3.5),
             timing("b", 1024, 1.0), timing("b", 8192, 1.0)]
  assert math.isclose(benchmark.slope_ms_per_1k(results, "a"), 0.5)
  assert math.isclose(benchmark.slope_ms_per_1k(results, "b"), 0.0, abs_tol=1e-12)
  assert math.isnan(benchmark.slope_ms_per_1k(results[:1], "a"))
