"""The README's examples run as written (checkpoint paths and machine size aside), and the docs
quote the demo's measured numbers from their one place (configs/demo.py EXPECTED)."""

import os
import re
from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def test_readme_model_example_runs(tmp_path):
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  example = blocks[0]
  assert "model.forward" in example and "generate.generate" in example
  # Point the conversion lines at a checkpoint the example itself writes.
  example = example.replace('convert.load_hf("path/to/MiniMax-Text-01-hf")',
                            f'(cfg, params) if convert.save_hf(cfg, params, "{tmp_path}") is None '
                            f'else None')
  example = example.replace('"out_dir"', f'"{tmp_path / "again"}"')
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  out, gen = namespace["out"], namespace["gen"]
  assert out.logits.shape == (1, 4, namespace["cfg"].vocab_size)
  assert gen.tokens.shape == (1, 8)
  assert os.path.exists(tmp_path / "again" / "model.safetensors")


def test_docs_quote_the_demo_numbers():
  line = demo.expected_line()
  for path in ("README.md", "docs/training.md"):
    with open(os.path.join(ROOT, path)) as f:
      text = f.read()
    assert line in text.replace("\n", " ").replace("  ", " "), path
  expected = demo.EXPECTED
  assert len(expected["seeds"]) == len(expected["sft_accuracy"]) == len(expected["rl_accuracy"])
  with open(os.path.join(ROOT, "docs/training.md")) as f:
    training = f.read()
  for row in zip(expected["seeds"], expected["sft_accuracy"], expected["rl_accuracy"]):
    assert "| {} | {:.3f} | {:.3f} |".format(*row) in training  # the per-seed table


def test_check_demo_compares_a_run_with_the_expected_range():
  from experiments import check_demo  # pylint: disable=g-import-not-at-top
  seed = demo.EXPECTED["seeds"][0]
  summary = {stage: {"eval/accuracy@end": demo.EXPECTED[f"{stage}_accuracy"][0]}
             for stage in ("sft", "rl")}
  lines = check_demo.compare(summary, seed)
  assert lines[0] == f"expected (configs/demo.py): {demo.expected_line()}"
  assert all("within the measured range" in line for line in lines[1:])
  summary["rl"]["eval/accuracy@end"] = 0.0
  assert "OUTSIDE the measured range" in check_demo.compare(summary, seed)[2]
