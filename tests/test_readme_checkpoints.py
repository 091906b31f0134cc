"""The README's real-checkpoint examples (load, generate; RL from an HF directory) run as
written on a small checkpoint in transformers format, with 8 fake CPU devices for the 64 GPUs."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from m1jax import config, convert, model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def _small_hf_checkpoint(directory):
  """A tiny model in transformers format with a character-level tokenizer.json for the
  arithmetic task, written with `tokenizers` (as a downloaded -hf directory holds them)."""
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "[UNK]"] + list("0123456789+=,# "))}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  tok.add_special_tokens(["<pad>", "<s>", "</s>"])
  cfg = config.preset("tiny", vocab_size=32)
  convert.save_hf(cfg, model.init(cfg, jax.random.key(0)), directory)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"}))


MESH_8 = ('{"fsdp": 8, "expert": 8}', '{"fsdp": 4, "expert": 2}')  # 64 GPUs -> 8 CPU devices


def test_readme_real_checkpoint_example_runs(tmp_path):
  _small_hf_checkpoint(tmp_path)
  example = next(block for block in re.findall(r"```python\n(.*?)```", _readme(), re.S)
                 if "load_hf(ckpt, shardings=shardings" in block)
  example = example.replace('"ckpt/MiniMax-M1-80k-hf"', f'"{tmp_path}"').replace(*MESH_8)
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["out"].tokens.shape == (1, 32)
  leaf = namespace["params"]["layers"]["layer_0"]["moe"]["w1"]
  assert leaf.sharding == namespace["shardings"]["layers"]["layer_0"]["moe"]["w1"]


def test_readme_rl_from_a_checkpoint_command_runs(tmp_path):
  _small_hf_checkpoint(tmp_path / "ckpt")
  command = re.search(r"```\n(\.venv/bin/python -m experiments\.train --config=configs/rl/"
                      r"cispo_arithmetic\.py .*?)```", _readme(), re.S).group(1)
  args = command.replace("\\\n", " ").split()[1:]
  args = [a for a in args if not a.startswith(("--num_processes", "--process_id",
                                               "--coordinator_address"))]  # one process here
  args = [a.replace("ckpt/MiniMax-M1-80k-hf", str(tmp_path / "ckpt"))
          .replace("workdirs/m1", str(tmp_path / "run"))
          .replace("--config.mesh.fsdp=8", "--config.mesh.fsdp=4")
          .replace("--config.mesh.expert=8", "--config.mesh.expert=2") for a in args]
  small = ["--config.rl.steps=1", "--config.rl.prompts_per_step=4",
           "--config.rl.samples_per_prompt=2", "--config.rl.updates_per_batch=1",
           "--config.task.eval_size=8", "--config.rl.max_new_tokens=8",
           "--config.eval.max_new_tokens=8", "--config.progress=False"]
  result = subprocess.run([sys.executable, *args, *small], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "run" / "summary.json") as f:
    assert json.load(f)["rl"]["last_step"] == 1
