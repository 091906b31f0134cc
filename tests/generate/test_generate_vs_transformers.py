"""Greedy generation equals transformers' MiniMaxForCausalLM.generate(do_sample=False).

Tiny random transformers models (float64, eager) are saved with save_pretrained and loaded with
convert.load_hf in float32. Weights use initializer_range 0.2 so that next-token distributions
are peaked: the smallest top-1/top-2 logit gap along these runs (4e-3, measured) is three orders
of magnitude above the fp32-vs-fp64 logit error (~1e-6), so greedy tokens must agree exactly.
"""

import numpy as np
import pytest
import torch
import transformers

from m1jax import convert, generate

MAX_NEW_TOKENS = 16
EOS = 2  # transformers' MiniMaxConfig default; both sides stop on it.
CONFIGS = {
    # 4 layers: 3 lightning + 1 softmax; GQA 4:2; block_size 5.
    "gqa2": dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 layer_types=["linear_attention", "linear_attention", "full_attention",
                              "linear_attention"], block_size=5),
    # 6 layers: 4 lightning + 2 softmax, one of them first; GQA 8:2; block_size 4.
    "gqa4": dict(num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=4,
                 layer_types=["full_attention", "linear_attention", "linear_attention",
                              "linear_attention", "full_attention", "linear_attention"],
                 block_size=4),
}
PROMPT_LENGTHS = (13, 7, 22)  # all longer than the block sizes; 13 and 22 not multiples


def _models(name, tmp_dir):
  torch.manual_seed(0)
  hf_cfg = transformers.MiniMaxConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_local_experts=4,
      num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
      tie_word_embeddings=False, initializer_range=0.2, full_attn_alpha_factor=1.7,
      linear_attn_alpha_factor=1.3, mlp_alpha_factor=1.5, mlp_beta_factor=0.9,
      eos_token_id=EOS, **CONFIGS[name])
  hf_cfg._experts_implementation = "eager"
  hf_cfg._attn_implementation = "eager"
  hf_model = transformers.MiniMaxForCausalLM(hf_cfg).double().eval()
  with torch.no_grad():
    for param_name, param in hf_model.named_parameters():
      if "norm" in param_name:
        param.add_(0.1 * torch.randn_like(param))
  hf_model.save_pretrained(tmp_dir)
  cfg, params = convert.load_hf(tmp_dir, dtype="float32")
  return hf_model, cfg, params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_transformers_generate(name, tmp_path):
  hf_model, cfg, params = _models(name, str(tmp_path))
  assert cfg.eos_token_id == EOS and cfg.num_softmax_layers >= 1 and cfg.num_lightning_layers >= 3
  rng = np.random.default_rng(1)
  for length in PROMPT_LENGTHS:
    prompt = rng.integers(3, cfg.vocab_size, length)
    with torch.no_grad():
      hf_tokens = hf_model.generate(torch.tensor(prompt[None]), do_sample=False,
                                    max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0)
    hf_tokens = hf_tokens[0, length:].numpy()
    if EOS in hf_tokens:
      hf_tokens = hf_tokens[:list(hf_tokens).index(EOS) + 1]
    out = generate.generate(cfg, params, [prompt.tolist()], max_new_tokens=MAX_NEW_TOKENS,
                            temperature=0.0)
    n = int(out.lengths[0])
    stopped = hf_tokens[-1] == EOS
    assert int(out.finish_reasons[0]) == (generate.FinishReason.EOS if stopped
                                          else generate.FinishReason.LENGTH)
    np.testing.assert_array_equal(np.asarray(out.tokens[0, :n]), hf_tokens)
