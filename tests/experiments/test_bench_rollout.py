"""The rollout benchmark runs end to end on CPU at tiny sizes; its ModelConfig switches parse."""

import csv
import sys

from absl import flags
from absl.testing import flagsaver
import pytest

from experiments import bench_rollout, reporting


def test_model_overrides_parse_literals_and_strings():
  assert reporting.model_overrides(["moe_gemm_impl=xla", "head_chunk_tokens=2048",
                                    "moe_capacity_factor=None"]) == {
      "moe_gemm_impl": "xla", "head_chunk_tokens": 2048, "moe_capacity_factor": None}
  assert reporting.model_overrides([]) == {}


def test_kernel_config_fields_are_overrides_too():
  from pallas_kernels import KernelConfig  # pylint: disable=g-import-not-at-top
  changes = reporting.model_overrides(["lightning_kernel.block_size=128", "moe_impl=dense",
                                       "lightning_kernel.forward_impl=triton"])
  assert changes == {"moe_impl": "dense", "lightning_kernel": KernelConfig(
      block_size=128, forward_impl="triton")}
  assert reporting.describe_overrides(changes) == (
      "moe_impl=dense,lightning_kernel.block_size=128,lightning_kernel.forward_impl=triton")
  with pytest.raises(ValueError, match="lightning_kernel.<field>"):
    reporting.model_overrides(["lightning_kernel.block=128"])


@pytest.mark.parametrize("item", ["moe_gemm=xla", "moe_gemm_impl", "=3"])
def test_model_overrides_name_the_bad_item(item):
  with pytest.raises(ValueError, match=f"model override '{item}'.*ModelConfig field"):
    reporting.model_overrides([item])


def test_variants_split_on_semicolons_then_commas():
  assert reporting.model_variants("moe_gemm_impl=xla;lightning_impl=pallas,moe_impl=dense;") == [
      {"moe_gemm_impl": "xla"}, {"lightning_impl": "pallas", "moe_impl": "dense"}]
  assert reporting.model_variants("") == []


def test_rollout_benchmark_writes_one_row_per_run(tmp_path):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])
  with flagsaver.flagsaver(preset="tiny", dtype="float32", param_dtypes=[], rows=["2"],
                           new_tokens=4, prompt_len=8, variants="moe_gemm_impl=xla", mix=True,
                           mix_rows=4, slots=2, mean_length=2.0, reps=1,
                           drain_slots=["-1", "1"], out_dir=str(tmp_path)):
    bench_rollout.main([])
  with open(tmp_path / "rollout.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["mode"] for r in rows] == ["static, float32 params, moe_gemm_impl=xla", "static",
                                       "refill 2/1, drain 0", "refill 2/1, drain 1"]
  assert [int(r["rows"]) for r in rows] == [2, 2, 4, 4]
  assert rows[2]["generated"] == rows[3]["generated"]  # draining changes no output
  assert int(rows[0]["generated"]) == 8  # no EOS: both rows run all 4 tokens
  assert (tmp_path / "rollout.md").read_text().count("| static") == 2
