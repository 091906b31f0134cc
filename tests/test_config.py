"""ModelConfig: presets, both HF dialects, round trip, validation messages."""

import json

import pytest

from m1jax import config

# The released MiniMax-M1 config.json (original remote-code dialect), as published.
RELEASED_M1_CONFIG = {
    "architectures": ["MiniMaxM1ForCausalLM"],
    "attention_dropout": 0.0,
    "attn_type_list": [0, 0, 0, 0, 0, 0, 0, 1] * 10,
    "bos_token_id": None,
    "eos_token_id": None,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "layernorm_full_attention_alpha": 3.5565588200778455,
    "layernorm_full_attention_beta": 1.0,
    "layernorm_linear_attention_alpha": 3.5565588200778455,
    "layernorm_linear_attention_beta": 1.0,
    "layernorm_mlp_alpha": 3.5565588200778455,
    "layernorm_mlp_beta": 1.0,
    "max_position_embeddings": 10240000,
    "model_type": "minimax_m1",
    "num_attention_heads": 64,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "postnorm": True,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000000,
    "rotary_dim": 64,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "shared_intermediate_size": 0,
    "shared_moe_mode": "sigmoid",
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.2",
    "use_cache": True,
    "vocab_size": 200064,
}


def test_released_config_equals_456b_preset():
  cfg = config.ModelConfig.from_hf(RELEASED_M1_CONFIG)
  assert cfg == config.preset("minimax-m1-456b")
  assert cfg.num_lightning_layers == 70 and cfg.num_softmax_layers == 10
  assert ([i for i, lightning in enumerate(cfg.is_lightning) if not lightning]
          == list(range(7, 80, 8)))
  assert cfg.slope_convention == "original" and cfg.effective_rotary_dim == 64


def test_from_hf_reads_a_file_and_a_directory(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(RELEASED_M1_CONFIG))
  assert (config.ModelConfig.from_hf(tmp_path)
          == config.ModelConfig.from_hf(tmp_path / "config.json"))


def test_transformers_dialect_maps_to_the_same_fields():
  cfg = config.preset("tiny", layernorm_mlp_beta=0.7, layernorm_full_attention_alpha=1.25)
  hf = cfg.to_hf()
  assert hf["model_type"] == "minimax"
  assert hf["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
  assert hf["mlp_beta_factor"] == 0.7 and hf["full_attn_alpha_factor"] == 1.25
  assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg.rope_theta}
  back = config.ModelConfig.from_hf(hf, dtype=cfg.dtype)
  assert back == cfg.replace(slope_convention="transformers")  # transformers' own convention


def test_transformers_config_without_rotary_dim_rotates_the_whole_head():
  hf = config.preset("tiny").to_hf()
  del hf["rotary_dim"]
  cfg = config.ModelConfig.from_hf(hf)
  assert cfg.rotary_dim == cfg.head_dim == cfg.effective_rotary_dim


def test_transformers_default_layout_alternates_starting_with_full_attention():
  hf = config.preset("tiny").to_hf()
  del hf["layer_types"]
  assert config.ModelConfig.from_hf(hf).attn_type_list == (1, 0, 1, 0)


def test_rope_full_head_knob():
  cfg = config.preset("tiny")
  assert cfg.effective_rotary_dim == cfg.rotary_dim < cfg.head_dim
  assert cfg.replace(rope_full_head=True).effective_rotary_dim == cfg.head_dim


@pytest.mark.parametrize("changes, message", [
    (dict(attn_type_list=(0, 0, 1)), "attn_type_list has 3 entries but num_hidden_layers=4"),
    (dict(attn_type_list=(0, 0, 2, 1)), "unknown layer type 2"),
    (dict(num_key_value_heads=3),
     "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5 exceeds num_local_experts=4"),
    (dict(rotary_dim=7), "rotary_dim=7: must be even"),
    (dict(rotary_dim=32), "rotary_dim=32: exceeds head_dim=16"),
    (dict(hidden_size=0), "hidden_size=0: must be a positive integer"),
    (dict(intermediate_size=-3), "intermediate_size=-3: must be a positive integer"),
    (dict(dtype="float8"), "dtype='float8': must be one of"),
    (dict(lightning_impl="cuda"), "lightning_impl='cuda': must be one of"),
    (dict(moe_capacity_factor=0.0), "moe_capacity_factor=0.0: must be positive"),
    (dict(shared_intermediate_size=128), "shared experts are not supported"),
])
def test_validation_names_the_field(changes, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config.preset("tiny", **changes)


def test_from_hf_rejects_bad_input():
  hf = config.preset("tiny").to_hf()
  with pytest.raises(ValueError, match="unknown config key 'fancy_knob'"):
    config.ModelConfig.from_hf({**hf, "fancy_knob": 1})
  with pytest.raises(ValueError, match="layer_types: unknown layer type 'mamba'"):
    config.ModelConfig.from_hf({**hf, "layer_types": ["mamba"] * 4})
  with pytest.raises(ValueError, match="layer_types"):
    config.ModelConfig.from_hf({**hf, "layer_types": ["full_attention"] * 3})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    config.ModelConfig.from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
  with pytest.raises(ValueError, match="has no field"):
    config.ModelConfig.from_hf(hf, not_a_field=1)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    config.preset("huge")


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("", "empty file"),
    ("[1, 2]", "expected a JSON object of model config keys, got list"),
])
def test_from_hf_names_the_file_that_is_not_a_config(tmp_path, text, message):
  path = tmp_path / "config.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=message) as info:
    config.ModelConfig.from_hf(tmp_path)
  assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("changes, message", [
    ({"rms_norm_eps": "1e-5"}, "field 'rms_norm_eps'='1e-5': expected a number"),
    ({"layer_types": None}, "field 'layer_types'=None: expected a list"),
    ({"hidden_size": 64.0}, "field 'hidden_size'=64.0: expected an integer"),
    ({"num_local_experts": "4"}, "field 'num_local_experts'='4': expected an integer"),
    ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings'='false': expected true or"),
    ({"rope_parameters": 7}, "field 'rope_parameters'=7: expected an object"),
])
def test_from_hf_names_the_field_of_the_wrong_type(tmp_path, changes, message):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**config.preset("tiny").to_hf(), **changes}))
  with pytest.raises(ValueError) as info:
    config.ModelConfig.from_hf(path)
  assert str(info.value).startswith(f"{path}: ") and message in str(info.value), info.value


def test_from_hf_requires_the_architecture_keys(tmp_path):
  hf = config.preset("tiny").to_hf()
  del hf["hidden_size"], hf["num_local_experts"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"missing architecture key\(s\) \['hidden_size', "
                                       r"'num_local_experts or num_experts'\]") as info:
    config.ModelConfig.from_hf(path)
  assert str(info.value).startswith(f"{path}: ")
