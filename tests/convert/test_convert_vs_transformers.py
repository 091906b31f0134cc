"""load_hf / save_hf against transformers.MiniMaxForCausalLM, the reference no one here wrote.

torch and transformers are test dependencies (installed by the test command) and are imported at
module level, so this file errors rather than skips if they are missing.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from m1jax import config, convert, model

# float32 model vs float64 transformers: fp32 rounding through <= 8 layers stays far below this.
FP32_TOL = 1e-4
# bfloat16 compute (8-bit mantissa: 3.9e-3 per rounding) through 4-8 post-norm layers, LM head in
# fp32: measured max |diff| / max |ref| 8.8e-3..1.7e-2 over 3 seeds x these 3 configs
# (fp32: 2-5e-7). 4e-2 leaves room for seed variation while any wrong weight mapping gives O(1)
# errors.
BF16_TOL = 4e-2

LT, FT = "linear_attention", "full_attention"
CONFIGS = {
    # Several lightning and softmax layers, GQA 4/2, top-2 of 4, block 5 with T = 23.
    "gqa_top2": dict(num_hidden_layers=4, layer_types=[LT, LT, FT, LT], num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                     block_size=5, full_attn_alpha_factor=1.7, linear_attn_alpha_factor=1.3,
                     mlp_alpha_factor=1.5, mlp_beta_factor=0.9),
    # The 7:1 layout, MHA, top-2 of 6, block 4.
    "hybrid_7to1": dict(num_hidden_layers=8, layer_types=[LT] * 7 + [FT], num_attention_heads=8,
                        num_key_value_heads=8, head_dim=4, num_local_experts=6,
                        num_experts_per_tok=2, block_size=4, full_attn_alpha_factor=2.0,
                        linear_attn_alpha_factor=2.0, mlp_alpha_factor=2.0),
    # Softmax first and last, MQA, top-3 of 5, block 7, non-unit betas.
    "mqa_top3": dict(num_hidden_layers=4, layer_types=[FT, LT, LT, FT], num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, num_local_experts=5, num_experts_per_tok=3,
                     block_size=7, linear_attn_beta_factor=0.8, full_attn_beta_factor=1.2),
}


def _build_reference(name, seed=0):
  """A tiny random transformers model in float64, norm weights moved off 1."""
  torch.manual_seed(seed)
  hf_config = transformers.MiniMaxConfig(
      vocab_size=101, hidden_size=32, intermediate_size=24, tie_word_embeddings=False,
      rope_parameters={"rope_type": "default", "rope_theta": 1e4}, **CONFIGS[name])
  hf_config._experts_implementation = "eager"  # grouped matmul does not support float64
  hf_config._attn_implementation = "eager"
  ref = transformers.MiniMaxForCausalLM(hf_config).double().eval()
  with torch.no_grad():
    for param_name, param in ref.named_parameters():
      if "norm" in param_name:
        param.add_(0.2 * torch.randn_like(param))
  return ref


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  ref = _build_reference(request.param)
  ckpt = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(ckpt)
  return ref, ckpt


def _tokens(seed, batch=3, length=23):
  return np.random.default_rng(seed).integers(0, 101, (batch, length))


def _reference_logits(ref, tokens, **kwargs):
  with torch.no_grad():
    return ref(torch.as_tensor(tokens), **kwargs)


def _max_rel(got, ref):
  return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def test_fp32_logits_and_aux_loss_match(reference):
  ref, ckpt = reference
  cfg, params = convert.load_hf(ckpt, dtype="float32")
  assert cfg.effective_rotary_dim == cfg.head_dim  # transformers rotates the whole head
  tokens = _tokens(1)
  expected = _reference_logits(ref, tokens, output_router_logits=True)
  out = jax.jit(lambda p, t: model.forward(cfg, p, t))(params, jnp.asarray(tokens))
  assert _max_rel(out.logits, expected.logits.numpy()) <= FP32_TOL
  np.testing.assert_allclose(float(out.aux_loss), float(expected.aux_loss), rtol=1e-5)


def test_bf16_logits_within_documented_tolerance(reference):
  ref, ckpt = reference
  cfg, params = convert.load_hf(ckpt, dtype="bfloat16", lm_head_dtype="float32")
  tokens = _tokens(2)
  expected = _reference_logits(ref, tokens).logits.numpy()
  logits = jax.jit(lambda p, t: model.forward(cfg, p, t).logits)(params, jnp.asarray(tokens))
  assert _max_rel(logits, expected) <= BF16_TOL


def test_round_trip_is_exact(reference, tmp_path):
  _, ckpt = reference
  cfg, params = convert.load_hf(ckpt, dtype="float32")
  convert.save_hf(cfg, params, tmp_path)
  cfg2, params2 = convert.load_hf(tmp_path, dtype="float32")
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Every tensor on disk is bit-identical to the reference's (float64 cast to float32).
  original = safetensors.numpy.load_file(ckpt / "model.safetensors")
  written = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  for key, value in written.items():
    np.testing.assert_array_equal(value, original[key].astype(np.float32))


def test_transformers_loads_what_save_hf_writes(tmp_path):
  cfg = config.preset("tiny", dtype="float32", rope_full_head=True, slope_convention="transformers")
  params = model.init(cfg, jax.random.key(7))
  convert.save_hf(cfg, params, tmp_path)
  loaded = transformers.MiniMaxForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager")
  tokens = _tokens(3, batch=2, length=37)
  expected = _reference_logits(loaded.eval(), tokens).logits.numpy()
  logits = jax.jit(lambda p, t: model.forward(cfg, p, t).logits)(params, jnp.asarray(tokens))
  assert _max_rel(logits, expected) <= FP32_TOL


def test_sharded_checkpoint_and_fused_expert_names(tmp_path):
  """transformers 5.x in-memory names (mlp.gate, fused gate_up_proj/down_proj) over 3+ shards."""
  ref = _build_reference("gqa_top2", seed=4)
  state = {k: v.float().numpy() for k, v in ref.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  ref.save_pretrained(tmp_path / "per_expert")
  (tmp_path / "fused").mkdir()
  (tmp_path / "fused" / "config.json").write_text(
      (tmp_path / "per_expert" / "config.json").read_text())
  keys = sorted(state)
  shards = [keys[i::3] for i in range(3)]
  weight_map = {}
  for n, shard_keys in enumerate(shards):
    name = f"model-{n + 1:05d}-of-00003.safetensors"
    safetensors.numpy.save_file({k: np.ascontiguousarray(state[k]) for k in shard_keys},
                                tmp_path / "fused" / name)
    weight_map.update({k: name for k in shard_keys})
  (tmp_path / "fused" / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": weight_map}))
  _, fused = convert.load_hf(tmp_path / "fused", dtype="float32")
  _, per_expert = convert.load_hf(tmp_path / "per_expert", dtype="float32")
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(per_expert)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
