"""Tests for m1jax.analysis.mismatch (Figure 3): on the tiny preset in float32 compute the sampler
(generate's incremental path) and the trainer (full forward, own routing or routing replay) must
agree to rounding; the report files have one row per generated token and arm; the statistics
and the stage loader are checked by hand."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import convert
from m1jax.analysis import mismatch

BATCH, PROMPT_LEN, NEW_TOKENS = 2, 8, 24  # 32 tokens: two lightning blocks of the tiny preset (16)


@pytest.fixture(scope="module")
def fp32_setup():
  cfg, params, _ = mismatch.load_model(preset="tiny", dtype="float32", logit_std=4.0)
  prompts = mismatch.random_prompts(cfg.vocab_size, BATCH, PROMPT_LEN, jax.random.key(1))
  result = mismatch.measure(cfg, params, prompts, key=jax.random.key(2),
                            max_new_tokens=NEW_TOKENS)
  return cfg, params, result


def test_pairs_cover_every_generated_token(fp32_setup):
  _, _, result = fp32_setup
  assert result.head_dtypes == ("bfloat16", "float32")
  assert result.arms == (("bfloat16", False), ("float32", False), ("bfloat16", True),
                         ("float32", True))
  assert result.tokens.shape == (BATCH, NEW_TOKENS) and result.mask.all()
  for dtype, replay in result.arms:
    p_trainer, p_sampler = result.probabilities(dtype, replay)
    assert p_trainer.shape == p_sampler.shape == (BATCH * NEW_TOKENS,)
    assert ((p_trainer > 0) & (p_trainer <= 1)).all()


@pytest.mark.parametrize("routing_replay", [False, True])
def test_float32_sampler_and_trainer_agree(fp32_setup, routing_replay):
  # float32 compute with a float32 head: the two paths differ only in summation order (~1e-7
  # relative), so probabilities agree to 1e-5 and Pearson r is 1 to ~1e-10, with either routing.
  _, _, result = fp32_setup
  p_trainer, p_sampler = result.probabilities("float32", routing_replay)
  np.testing.assert_allclose(p_sampler, p_trainer, atol=1e-5, rtol=0)
  stats = result.stats("float32", routing_replay=routing_replay)
  assert stats["pearson_r"] > 1 - 1e-9
  assert stats["max_abs_dp"] < 1e-5 and stats["frac_abs_dp_gt_threshold"] == 0
  # The scaled head spreads the sampled tokens' probabilities over (0, 1) (the plot needs it).
  assert np.quantile(p_trainer, 0.1) < 0.1 and np.quantile(p_trainer, 0.9) > 0.5


def test_float32_paths_route_alike(fp32_setup):
  # Rounding-level hidden differences do not change the top-k of any token here, in the
  # trainer (own routing) nor in the replayed sampler path against generate's own recording.
  cfg, _, result = fp32_setup
  assert result.routing_mismatch.shape == (cfg.num_hidden_layers,)
  assert not result.routing_mismatch.any() and result.generate_routing_mismatch == 0


def test_trainer_replays_the_given_experts(fp32_setup):
  # trainer_hidden with replay_experts routes the fed generated tokens (all but the last) to
  # them and leaves the last token's routing alone. Other prompts and keys than the fixture's, at
  # its shapes: the programs measure compiled serve again.
  cfg, params, _ = fp32_setup
  out = mismatch.sample(cfg, params, mismatch.random_prompts(cfg.vocab_size, BATCH, PROMPT_LEN,
                                                             jax.random.key(3)),
                        key=jax.random.key(4), max_new_tokens=NEW_TOKENS)
  _, _, own = mismatch.trainer_hidden(cfg, params, out.sequences, out.sequence_mask, PROMPT_LEN)
  other = (own + 1) % cfg.num_local_experts
  _, _, replayed = mismatch.trainer_hidden(cfg, params, out.sequences, out.sequence_mask,
                                           PROMPT_LEN, other)
  np.testing.assert_array_equal(replayed[:, :-1], other[:, :-1])
  np.testing.assert_array_equal(replayed[:, -1], own[:, -1])


def test_routing_mismatch_by_hand():
  # Token sets {0, 1} vs {1, 0} agree (order does not matter), {0, 2} vs {0, 1} differ; the
  # masked-out token does not count: layer 0 1 of 2 tokens, layer 1 none.
  experts = np.array([[[[0, 1], [3, 2]], [[0, 2], [1, 2]], [[5, 5], [5, 5]]]])  # [1, 3, 2, 2]
  reference = np.array([[[[1, 0], [2, 3]], [[0, 1], [2, 1]], [[0, 1], [0, 1]]]])
  np.testing.assert_allclose(mismatch.routing_mismatch(experts, reference,
                                                       np.array([[True, True, False]])),
                             [0.5, 0.0])


def test_replay_reproduces_generate_logprobs(fp32_setup):
  # The replayed incremental path must compute what generate computed: same float32 ops, 1e-5.
  _, _, result = fp32_setup
  assert result.replay_max_abs_dp < 1e-5
  np.testing.assert_allclose(result.sampler_logprobs["float32"], result.generate_logprobs,
                             atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_gpu_bf16_replay_reproduces_generate():
  """On a GPU with bf16 compute, two layer groups unrolled, the decode kernel and every expert
  at decode (the small preset's paths, at tiny sizes): the replay computes what generate
  computed (generate reads weights cast once to bf16; the float32 masters are not equivalent
  there), the same log-probs and the same experts."""
  from m1jax import config, model  # pylint: disable=g-import-not-at-top
  layers = 8
  cfg = config.preset("tiny", dtype="bfloat16", num_hidden_layers=layers,
                      attn_type_list=config.hybrid_layout(layers, period=4),
                      layernorm_full_attention_alpha=config.alpha_for_depth(layers),
                      layernorm_linear_attention_alpha=config.alpha_for_depth(layers),
                      layernorm_mlp_alpha=config.alpha_for_depth(layers), layer_scan_unroll=2)
  params, _ = mismatch.rescale_lm_head(model.init(cfg, jax.random.key(0)), 4.0)
  prompts = mismatch.random_prompts(cfg.vocab_size, BATCH, PROMPT_LEN, jax.random.key(1))
  result = mismatch.measure(cfg, params, prompts, key=jax.random.key(2),
                            max_new_tokens=NEW_TOKENS)
  assert result.replay_max_abs_dp < 1e-5
  assert result.generate_routing_mismatch == 0.0


def test_float32_layer_differences_are_tiny(fp32_setup):
  # float32 rounding only: relative differences ~1e-7, far below 1e-5, and finite.
  cfg, _, result = fp32_setup
  assert result.layer_rel_l2.shape == result.layer_max_token_rel_l2.shape == (
      cfg.num_hidden_layers,)
  for replay in (False, True):
    for values in result.layer_stats(replay):
      assert values.shape == (cfg.num_hidden_layers + 1,)
      assert np.isfinite(values).all() and (values < 1e-5).all()
  assert result.is_lightning == cfg.is_lightning


def test_report_files(fp32_setup, tmp_path):
  cfg, _, result = fp32_setup
  text = mismatch.write_report(result, str(tmp_path), "tiny test run")
  assert text.startswith("tiny test run") and "0.987319" in text
  for name in ("fig3_mismatch.png", "fig3_layers.png", "fig3_tables.md"):
    assert os.path.getsize(tmp_path / name) > 0
  with open(tmp_path / "fig3_pairs.csv") as f:
    pairs = list(csv.DictReader(f))
  assert len(pairs) == 4 * BATCH * NEW_TOKENS
  assert {(r["lm_head_dtype"], r["routing_replay"]) for r in pairs} == {
      ("bfloat16", "0"), ("float32", "0"), ("bfloat16", "1"), ("float32", "1")}
  with open(tmp_path / "fig3_summary.csv") as f:
    summary = {(r["lm_head_dtype"], r["routing_replay"]): r for r in csv.DictReader(f)}
  # Written with 9 significant digits; the paper's value only beside the arms without replay.
  for replay in (False, True):
    assert float(summary["float32", str(int(replay))]["pearson_r"]) == pytest.approx(
        result.stats("float32", routing_replay=replay)["pearson_r"], abs=1e-8)
  assert summary["bfloat16", "0"]["paper_pearson_r"] == "0.987319"
  assert summary["bfloat16", "1"]["paper_pearson_r"] == ""
  with open(tmp_path / "fig3_layers.csv") as f:
    layers = list(csv.DictReader(f))
  assert [r["kind"] for r in layers] == (
      ["lightning" if l else "softmax" for l in cfg.is_lightning] + ["final"])
  assert [float(r["routing_mismatch"]) for r in layers[:-1]] == list(result.routing_mismatch)
  assert float(layers[-1]["replay_rel_l2"]) == pytest.approx(result.replay_final_rel_l2,
                                                             rel=1e-5)


def test_probability_stats_by_hand():
  # dp = (0, 0.02, -0.005, 0): mean 0.00625, max 0.02, one of four above 0.01.
  p_trainer = np.array([0.1, 0.5, 0.9, 0.3])
  p_sampler = np.array([0.1, 0.52, 0.895, 0.3])
  stats = mismatch.probability_stats(p_trainer, p_sampler)
  assert stats["n_tokens"] == 4
  assert stats["mean_abs_dp"] == pytest.approx(0.00625, rel=1e-12)
  assert stats["max_abs_dp"] == pytest.approx(0.02, rel=1e-12)
  assert stats["frac_abs_dp_gt_threshold"] == 0.25
  centred_t, centred_s = p_trainer - p_trainer.mean(), p_sampler - p_sampler.mean()
  expected_r = centred_t @ centred_s / np.sqrt((centred_t @ centred_t) * (centred_s @ centred_s))
  assert stats["pearson_r"] == pytest.approx(expected_r, rel=1e-12)
  with pytest.raises(ValueError, match="p_trainer"):
    mismatch.probability_stats(p_trainer, p_sampler[:3])


def test_relative_l2_by_hand():
  # Layer 0 is off by 1% on every token, layer 1 by 10% on the masked-out token only.
  b = jnp.ones((2, 1, 3, 4))  # [L, B, N, E]
  a = b.at[0].multiply(1.01).at[1, 0, 2].multiply(1.1)
  mask = jnp.array([[True, True, False]])
  total, worst = mismatch.relative_l2(a, b, mask)
  np.testing.assert_allclose(total, [0.01, 0.0], atol=1e-6)
  np.testing.assert_allclose(worst, [0.01, 0.0], atol=1e-6)


def test_rescale_lm_head_sets_logit_std(fp32_setup):
  # Unit-RMS hidden states through the rescaled head: logit std within 5% of the target (the
  # fixture's head was scaled to 4; rescaling to 3 must follow the head's current std).
  cfg, params, _ = fp32_setup
  params, factor = mismatch.rescale_lm_head(params, 3.0)
  assert factor == pytest.approx(0.75, rel=1e-3)
  hidden = jax.random.normal(jax.random.key(1), (256, cfg.hidden_size))
  logits = hidden @ params["lm_head"]
  assert float(jnp.std(logits)) == pytest.approx(3.0, rel=0.05)
  with pytest.raises(ValueError, match="logit_std"):
    mismatch.rescale_lm_head(params, 0.0)


def test_load_model_rejects_conflicting_sources():
  with pytest.raises(ValueError, match="at most one"):
    mismatch.load_model(hf_dir="a", params_from="b")
  with pytest.raises(ValueError, match="logit_std"):
    mismatch.load_model(hf_dir="a", logit_std=2.0)
  with pytest.raises(ValueError, match="dtype"):
    mismatch.load_model(dtype="int8")


def test_load_model_from_hf_dir(fp32_setup, tmp_path):
  # The HF checkpoint path keeps the weights (float32 on disk: exact) and sets the compute dtype.
  cfg, params, _ = fp32_setup
  convert.save_hf(cfg, params, tmp_path)
  loaded_cfg, loaded, description = mismatch.load_model(hf_dir=str(tmp_path), dtype="bfloat16")
  assert loaded_cfg.dtype == "bfloat16" and loaded_cfg.num_hidden_layers == cfg.num_hidden_layers
  assert str(tmp_path) in description
  jax.tree.map(np.testing.assert_array_equal, params, loaded)
