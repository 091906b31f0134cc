"""Tests for m1jax.flops: hand-computed tiny archs, t-dependence of each term, parameter counts of
the Figure 1 models against m1jax.model and the published totals, closed-form sums vs loops."""

import numpy as np
import pytest

from m1jax import config
from m1jax import flops
from m1jax import model

# FLOPs are float64 sums of integers far below 2^53: exact up to rounding of the last bit.
RTOL = 1e-12


def _tiny_hybrid():
  # Layer 0: softmax GQA + dense MLP; layer 1: lightning + MoE (2 of 4 experts + 1 shared).
  return flops.DecoderArch(
      name="tiny-hybrid", vocab_size=10, hidden_size=8,
      layer_kinds=(flops.SOFTMAX, flops.LIGHTNING), num_heads=2, num_kv_heads=1, head_dim=4,
      lightning_block_size=6, num_experts=4, experts_per_token=2, expert_width=3,
      num_shared_experts=1, shared_expert_width=2, num_dense_layers=1, dense_width=5)


def _tiny_mla():
  return flops.DecoderArch(
      name="tiny-mla", vocab_size=10, hidden_size=8, layer_kinds=(flops.MLA,), num_heads=2,
      mla=flops.MLADims(q_lora_rank=3, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=1,
                        v_head_dim=2),
      dense_width=5)


def test_tiny_hybrid_flops_by_hand():
  # Matmul params: softmax q 8*2*4 + k 8*4 + v 8*4 + o 2*4*8 = 192; lightning 5*8*(2*4) = 320;
  # dense MLP 3*8*5 = 120; MoE router 8*4 + 2 experts * 3*8*3 + shared 3*8*2 = 224; LM head 80.
  # 2 * 936 = 1872. Lightning step per head 4*4^2 + 4^2 = 80, 2 heads: 160. Softmax 4*t*2*4 = 32 t.
  arch = _tiny_hybrid()
  t = np.array([1, 10, 1000])
  np.testing.assert_allclose(flops.flops_per_token(arch, t), 2032 + 32 * t, rtol=RTOL)
  terms = flops.flops_breakdown(arch, 10)
  expected = {"attention_projections": 1024, "mlp": 688, "lm_head": 160, "embedding": 0,
              "softmax_attention": 320, "lightning_attention": 160, "mla_attention": 0}
  assert {k: float(v) for k, v in terms.items()} == expected
  # Chunked lightning (block 6): 4 * 4 * (6 + 4) = 160 per head.
  chunked = flops.flops_breakdown(arch, 10, flops.Counting(lightning_form="chunked"))
  assert float(chunked["lightning_attention"]) == 320
  no_mlp = flops.flops_per_token(arch, 10, flops.Counting(include_mlp=False))
  assert float(no_mlp) == 2352 - 688
  with_embedding = flops.flops_per_token(arch, 10, flops.Counting(embedding_as_matmul=True))
  assert float(with_embedding) == 2352 + 160


def test_tiny_hybrid_param_counts_by_hand():
  # Norms: 2*8 per layer, lightning inner norm 2*4, final norm 8. MoE total: 32 + 4*72 + 48 = 368.
  counts = flops.param_counts(_tiny_hybrid())
  assert counts["active_matmul"] == 856
  assert counts["active_per_token"] == 856 + 16 + 16 + 8 + 8
  assert counts["total"] == 80 + 80 + 8 + (192 + 16 + 120) + (320 + 8 + 16 + 368)
  assert counts["active_with_embeddings"] == counts["active_per_token"] + 160


def test_tiny_mla_flops_by_hand():
  # q 8*3 + 3*2*(2+1) = 42; kv_a 8*(4+1) = 40; kv_b 4*2*(2+2) = 32; o 2*2*8 = 32; dense 120;
  # LM head 80: 2 * 346 = 692. Absorbed per head per key: 2*(4+1) + 2*4 = 18; naive 2*3 + 2*2 = 10.
  arch = _tiny_mla()
  t = np.array([1, 7, 500])
  np.testing.assert_allclose(flops.flops_per_token(arch, t), 692 + 2 * 18 * t, rtol=RTOL)
  naive = flops.flops_per_token(arch, t, flops.Counting(mla_form="naive"))
  np.testing.assert_allclose(naive, 692 + 2 * 10 * t, rtol=RTOL)
  assert flops.param_counts(arch)["total"] == 80 + 80 + 8 + 146 + 120 + 16 + 3 + 4


def test_lightning_constant_softmax_linear_in_context():
  arch = flops.minimax_m1()
  t = np.array([1, 1024, 131072])
  terms = flops.flops_breakdown(arch, t)
  np.testing.assert_array_equal(terms["lightning_attention"], 70 * 64 * 5 * 128 ** 2)
  np.testing.assert_array_equal(terms["softmax_attention"], 10 * 4 * 64 * 128 * t)
  for name in ("attention_projections", "mlp", "lm_head"):
    assert np.all(terms[name] == terms[name][0]) and terms[name][0] > 0


def test_minimax_m1_arch_matches_model_param_counts():
  # Exact: same shapes counted two ways (45.94B active excluding embedding and LM head).
  cfg = config.preset("minimax-m1-456b")
  ours = flops.param_counts(flops.arch_from_model_config(cfg))
  reference = model.param_counts(cfg)
  assert ours["active_per_token"] == reference["active_per_token"] == 45_944_920_064
  assert ours["total"] == reference["total"]
  assert ours["lm_head"] == reference["lm_head"]


def test_tiny_preset_arch_matches_model_param_counts():
  cfg = config.preset("tiny")
  ours = flops.param_counts(flops.arch_from_model_config(cfg))
  reference = model.param_counts(cfg)
  assert (ours["total"], ours["active_per_token"]) == (reference["total"],
                                                      reference["active_per_token"])


@pytest.mark.parametrize("arch_fn, total, active", [
    (flops.deepseek_r1, 671e9, 37e9),
    (flops.qwen3_235b_a22b, 235e9, 22e9),
    (flops.minimax_m1, 456e9, 45.9e9),
])
def test_published_parameter_counts(arch_fn, total, active):
  # Published totals are rounded to ~3 digits and their "active" conventions differ (R1, Qwen3:
  # embedding and LM head included; M1: excluded): 2% covers both.
  counts = flops.param_counts(arch_fn())
  key = "active_per_token" if arch_fn is flops.minimax_m1 else "active_with_embeddings"
  np.testing.assert_allclose(counts["total"], total, rtol=0.02)
  np.testing.assert_allclose(counts[key], active, rtol=0.02)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("prompt_len", [0, 5])
def test_cumulative_equals_loop(causal, prompt_len):
  counting = flops.Counting(causal=causal)
  for arch in (_tiny_hybrid(), _tiny_mla(), flops.deepseek_r1()):
    for length in (0, 1, 2, 17):
      if causal:
        contexts = prompt_len + np.arange(1, length + 1)
      else:
        contexts = np.full(length, prompt_len + length)
      loop = sum(float(flops.flops_per_token(arch, t, counting)) for t in contexts)
      got = flops.cumulative_flops(arch, length, prompt_len, counting)
      np.testing.assert_allclose(got, loop, rtol=RTOL)
  lengths = np.array([0, 3, 17])
  vector = flops.cumulative_flops(_tiny_hybrid(), lengths, prompt_len, counting)
  scalars = [flops.cumulative_flops(_tiny_hybrid(), n, prompt_len, counting) for n in lengths]
  np.testing.assert_allclose(vector, scalars, rtol=RTOL)


@pytest.mark.parametrize("causal", [True, False])
def test_quadratic_fit_is_exact(causal):
  counting = flops.Counting(causal=causal)
  arch = flops.qwen3_235b_a22b()
  a, b = flops.quadratic_fit(arch, counting)
  lengths = np.array([1, 1000, 131072])
  np.testing.assert_allclose(flops.cumulative_flops(arch, lengths, counting=counting),
                             a * lengths + b * lengths ** 2 / 2, rtol=RTOL)


def test_paper_fits_reproduce_plotted_values():
  # The two sets of paper numbers are consistent (values are read off a plot to ~0.01e16).
  lengths = np.asarray(flops.PAPER_FIG1_LENGTHS, dtype=np.float64)
  for name, (a, b) in flops.PAPER_FIG1_FITS.items():
    np.testing.assert_allclose(a * lengths + b * lengths ** 2 / 2, flops.PAPER_FIG1_FLOPS[name],
                               atol=0.015e16)


def test_compare_with_paper():
  result = flops.compare_with_paper(flops.figure1_archs())
  np.testing.assert_allclose(result["paper minimax-m1/deepseek-r1"],
                             [0.36 / 0.62, 0.77 / 2.0, 1.28 / 4.44, 1.71 / 7.0], rtol=RTOL)
  # M1 is cheaper than Qwen3 at 64K and beyond, and below half of R1 from 32K on, in our count.
  assert np.all(result["minimax-m1/qwen3-235b-a22b"][1:] < 1)
  assert np.all(result["minimax-m1/deepseek-r1"] < 0.5)
  ratios = result["minimax-m1/deepseek-r1"]
  assert np.all(np.diff(ratios) < 0)


def test_bad_inputs_raise():
  arch = _tiny_hybrid()
  with pytest.raises(ValueError, match="t="):
    flops.flops_per_token(arch, 0)
  with pytest.raises(ValueError, match="length="):
    flops.cumulative_flops(arch, -1)
  with pytest.raises(ValueError, match="mla_form"):
    flops.Counting(mla_form="latent")
  with pytest.raises(ValueError, match="layer_kinds"):
    flops.DecoderArch(name="bad", vocab_size=10, hidden_size=8, layer_kinds=("mamba",),
                      num_heads=2, head_dim=4, dense_width=4)
  with pytest.raises(ValueError, match="num_kv_heads"):
    flops.DecoderArch(name="bad", vocab_size=10, hidden_size=8, layer_kinds=(flops.SOFTMAX,),
                      num_heads=3, num_kv_heads=2, head_dim=4, dense_width=4)
  with pytest.raises(ValueError, match="compare_with_paper|missing"):
    flops.compare_with_paper({"minimax-m1": flops.minimax_m1()})
