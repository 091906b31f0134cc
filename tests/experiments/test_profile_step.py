"""The profile reader: op_names from HLO text, the component of an op_name, and a real trace of a
tiny model on CPU attributed to its components."""

import jax
import pytest

from experiments.benchmarks import profile
from m1jax import config, model

HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation.3 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %exponential.1 = f32[4]{0} exponential(%param_0), metadata={op_name="jit(step)/Transformer/layers/layer_1/moe/router/exp"}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %add.2 = f32[4]{0} add(%p, %p), metadata={op_name="jit(step)/optimizer/add" source_file="x.py"}
  ROOT %loop_fusion.3 = f32[4]{0} fusion(%add.2), kind=kLoop, calls=%fused_computation.3
}
"""


def test_op_names_read_instructions_and_fusions_without_metadata():
  module, names = profile.op_names(HLO)
  assert module == "jit_step"
  assert names["add.2"] == "jit(step)/optimizer/add"
  assert names["loop_fusion.3"] == "jit(step)/Transformer/layers/layer_1/moe/router/exp"


@pytest.mark.parametrize("op_name, want", [
    ("jit(f)/transpose(jvp(Transformer))/while/body/closed_call/layers/layer_7/attn/dot_general",
     "softmax attention"),
    ("jit(f)/jvp(Transformer)/while/body/layers/layer_0/attn/mul", "lightning attention"),
    ("jit(f)/Transformer/layers/layer_2/moe/experts/pallas_call", "MoE expert GEMMs"),
    ("jit(f)/Transformer/layers/layer_2/moe/dispatch/sort", "MoE dispatch (sort, gather)"),
    ("jit(f)/Transformer/layers/layer_2/post_attn_norm/mul", "norms + residuals"),
    ("jit(f)/jvp()/while/body/checkpoint/lm_head/jit(log_softmax)/reduce_max",
     "LM head + log-probs"),
    ("jit(f)/optimizer/cond", "optimizer update"),
    ("jit(g)/jit(_generate)/while/body/decode/Transformer/while/body/layers/layer_1/moe/router/"
     "top_k", "decode: MoE router"),
    ("jit(g)/jit(_generate)/prefill/Transformer/jit(_take)/gather", "prefill: embedding"),
    ("jit(g)/jit(_generate)/sample/vmap()/reduce", "sampling"),
])
def test_components_from_name_scopes(op_name, want):
  cfg = config.preset("small")  # layers 0-6 lightning, 7 softmax in each group of 8
  assert profile.model_classifier(cfg)(op_name) == want


def test_profile_of_a_tiny_forward_on_cpu():
  cfg = config.preset("tiny")
  params = model.init(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
  compiled = jax.jit(lambda p, t: model.forward(cfg, p, t).logits).lower(params, tokens).compile()
  result = profile.profile(compiled, (params, tokens), 2, profile.model_classifier(cfg))
  names = {c.component for c in result.components}
  assert {"lightning attention", "softmax attention", "MoE expert GEMMs",
          "LM head + log-probs"} <= names, names
  assert sum(c.share for c in result.components) == pytest.approx(1.0)
  assert 0 < result.busy_ms <= result.kernel_ms + 1e-9
  assert result.top_ops and result.top_ops[0].kernel_ms >= result.top_ops[-1].kernel_ms
  assert "all kernels" in profile.component_table(result)
