"""The README's model API example runs as written (checkpoint paths aside)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_model_example_runs(tmp_path):
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
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
