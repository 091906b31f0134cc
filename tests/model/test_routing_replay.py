"""MoE routing replay: route() with replayed experts, the MoE module on every expert path
(dropless, capacity factor, dense), model.forward's routed_experts / routing_replay, and the
sampler's recording (GenerateConfig.record_experts) replayed by the trainer's forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

from m1jax import config, generate, model
from m1jax.generate import sampling
from m1jax.model import moe


def test_expert_id_dtype_is_the_smallest_that_fits():
  assert moe.expert_id_dtype(4) == jnp.uint8
  assert moe.expert_id_dtype(256) == jnp.uint8
  assert moe.expert_id_dtype(257) == jnp.uint16
  assert moe.expert_id_dtype(65537) == jnp.uint32


def test_route_replays_experts_with_renormalised_current_weights():
  # Replayed rows: the given ids, weights = the router's probabilities there / their sum
  # (float32, 1e-6). Other rows: exactly the plain top-k routing.
  n, e, x, k = 6, 8, 5, 2
  h = jax.random.normal(jax.random.key(0), (n, e))
  router = jax.random.normal(jax.random.key(1), (e, x))
  probs, weights, experts = moe.route(h, router, k)
  replayed = jnp.array([[4, 0], [1, 2], [3, 4], [0, 1], [2, 3], [4, 1]])
  mask = jnp.array([True, True, False, True, False, True])
  r_probs, r_weights, r_experts = moe.route(h, router, k, moe.RoutingReplay(
      replayed.astype(jnp.uint8), mask))
  np.testing.assert_array_equal(r_probs, probs)
  np.testing.assert_array_equal(r_experts, jnp.where(mask[:, None], replayed, experts))
  picked = np.take_along_axis(np.asarray(probs), np.asarray(replayed), axis=-1)
  expected = picked / picked.sum(-1, keepdims=True)
  np.testing.assert_allclose(r_weights[mask], expected[np.asarray(mask)], rtol=1e-6)
  np.testing.assert_array_equal(r_weights[~mask], weights[~mask])
  # The weights stay differentiable in the router (the replayed ids are constants).
  grad = jax.grad(lambda r: jnp.sum(moe.route(h, r, k, moe.RoutingReplay(replayed, mask))[1]
                                    * jnp.arange(k)))(router)
  assert float(jnp.abs(grad).max()) > 0


@pytest.mark.parametrize("path", [dict(moe_impl="ragged"),
                                  dict(moe_impl="ragged", moe_capacity_factor=100.0),
                                  dict(moe_impl="dense")])
def test_moe_block_evaluates_the_replayed_experts_on_every_path(path):
  # The MoE output with replay equals the dense reference evaluated at the replayed experts
  # with renormalised router weights (float32, 1e-5: different summation orders); the block
  # reports the replayed experts; a capacity factor of 100 drops nothing.
  cfg = config.preset("tiny", **path)
  block = moe.MoE(cfg)
  h = jax.random.normal(jax.random.key(0), (2, 5, cfg.hidden_size))
  variables = block.init(jax.random.key(1), h)
  params = jax.tree.map(lambda a: a * 5, nn.meta.unbox(variables["params"]))  # weighty experts
  replayed = jax.random.randint(jax.random.key(2), (2, 5, 2), 0, cfg.num_local_experts)
  replayed = replayed.at[..., 1].set((replayed[..., 0] + 1) % cfg.num_local_experts)
  mask = jnp.array([[True, True, False, True, True], [False, True, True, True, False]])
  out, stats, experts = block.apply({"params": params}, h, None,
                                    moe.RoutingReplay(replayed, mask))
  plain_out, _, plain_experts = block.apply({"params": params}, h)
  np.testing.assert_array_equal(experts, jnp.where(mask[..., None], replayed, plain_experts))
  x = h.reshape(10, -1)
  probs, weights, flat_experts = moe.route(x, params["router"], 2, moe.RoutingReplay(
      replayed.reshape(10, 2), mask.reshape(10)))
  reference = moe.experts_dense(x, weights, flat_experts, params["w1"], params["w3"],
                                params["w2"], jnp.float32)
  np.testing.assert_allclose(out.reshape(10, -1), reference, rtol=1e-5, atol=1e-6)
  counts = np.bincount(np.asarray(experts).ravel(), minlength=cfg.num_local_experts)
  np.testing.assert_array_equal(stats.assignments, counts)
  assert float(stats.dropped) == 0.0
  assert float(jnp.abs(out - plain_out).max()) > 1e-3  # the replay changed the output


def test_forward_returns_and_replays_experts():
  # Replaying a forward's own routing reproduces it bit for bit; other experts change the
  # logits; prompt-style rows outside the mask keep their own routing; bad shapes are refused.
  cfg = config.preset("tiny")
  params = model.init(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  base = model.forward(cfg, params, tokens)
  out = model.forward(cfg, params, tokens, return_experts=True)
  assert out.routed_experts.shape == (2, 10, cfg.num_hidden_layers, 2)
  assert base.routed_experts is None
  np.testing.assert_array_equal(out.logits, base.logits)
  everywhere = jnp.ones((2, 10), bool)
  same = model.forward(cfg, params, tokens, return_experts=True, routing_replay=model.RoutingReplay(
      out.routed_experts.astype(jnp.uint8), everywhere))
  np.testing.assert_array_equal(same.logits, base.logits)
  other = (out.routed_experts + 1) % cfg.num_local_experts
  late = jnp.arange(10)[None, :] >= 6
  late_replay = model.RoutingReplay(other, jnp.broadcast_to(late, (2, 10)))
  changed = model.forward(cfg, params, tokens, return_experts=True, routing_replay=late_replay)
  np.testing.assert_array_equal(changed.routed_experts[:, 6:], other[:, 6:])
  np.testing.assert_array_equal(changed.routed_experts[:, :6], out.routed_experts[:, :6])
  np.testing.assert_array_equal(changed.logits[:, :6], base.logits[:, :6])  # causal
  assert float(jnp.abs(changed.logits[:, 6:] - base.logits[:, 6:]).max()) > 0
  with pytest.raises(ValueError, match="routing_replay"):
    model.forward(cfg, params, tokens,
                  routing_replay=model.RoutingReplay(other[:, :, :2], everywhere))


def _weighty_experts(params, factor):
  """Expert weights times `factor`: at random init a tiny-preset MoE block adds ~0.1% to the
  residual (its output norm over the residual's), so routing hardly matters; x6 (x216 on the
  output) makes it a sizeable part, as in a trained model."""
  def scale(path, x):
    return x * factor if path[-1].key in ("w1", "w2", "w3") else x
  return jtu.tree_map_with_path(scale, params)


@pytest.fixture(scope="module")
def sampled():
  """fp32 sampler, 16 experts; rows of 8 random prompt tokens and 24 sampled tokens."""
  cfg = config.preset("tiny", dtype="float32", num_local_experts=16)
  params = model.init(cfg, jax.random.key(0))
  params = _weighty_experts({**params, "lm_head": params["lm_head"] * 8}, 6.0)
  prompts = jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size)
  kwargs = dict(key=jax.random.key(2), max_new_tokens=24, eos_token_ids=(), repetition_window=0)
  out = generate.generate(cfg, params, prompts, record_experts=True, **kwargs)
  return cfg, params, out, generate.generate(cfg, params, prompts, **kwargs)


def _replay(cfg, out):
  """The trainer's RoutingReplay for GenerateOutput `out`: the response tokens that were fed."""
  batch, width = out.prompt_tokens.shape
  fed = jnp.arange(out.tokens.shape[1])[None, :] < out.lengths[:, None] - 1
  prompt = jnp.zeros((batch, width, cfg.num_hidden_layers, cfg.num_experts_per_tok),
                     out.experts.dtype)
  return (model.RoutingReplay(jnp.concatenate([prompt, out.experts], axis=1),
                              jnp.concatenate([jnp.zeros((batch, width), bool), fed], axis=1)),
          np.asarray(fed))


def test_recording_experts_changes_nothing_else(sampled):
  cfg, _, out, plain = sampled
  for name in ("tokens", "logprobs", "lengths", "finish_reasons"):
    np.testing.assert_array_equal(getattr(out, name), getattr(plain, name), err_msg=name)
  assert plain.experts is None
  assert out.experts.dtype == jnp.uint8
  assert out.experts.shape == out.tokens.shape + (cfg.num_hidden_layers, 2)
  assert not np.asarray(out.experts)[:, -1].any()  # the last token is never fed


@pytest.fixture(scope="module")
def trainer_forwards(sampled):
  """The trainer's forwards of the sampled rows in bf16 (another engine's precision), with its
  own routing and with the sampler's experts replayed on the fed response tokens."""
  cfg, params, out, _ = sampled
  trainer = cfg.replace(dtype="bfloat16")
  replay, fed = _replay(cfg, out)
  own, replayed = (model.forward(trainer, params, out.sequences, token_mask=out.sequence_mask,
                                 return_experts=True, routing_replay=routing_replay)
                   for routing_replay in (None, replay))
  return own, replayed, fed


def test_trainer_replays_exactly_the_samplers_experts(sampled, trainer_forwards):
  # The trainer in bf16 routes some response tokens differently from the fp32 sampler; with
  # replay it evaluates exactly the sampler's experts there, and routes the prompt as it does
  # without replay.
  _, _, out, _ = sampled
  own, replayed, fed = trainer_forwards
  width = out.prompt_tokens.shape[1]
  sampler_sets = np.sort(np.asarray(out.experts), -1)
  own_sets = np.sort(np.asarray(own.routed_experts[:, width:]), -1)
  assert np.any(own_sets != sampler_sets, axis=-1)[fed].sum() >= 3
  np.testing.assert_array_equal(np.asarray(replayed.routed_experts[:, width:])[fed],
                                np.asarray(out.experts)[fed])
  np.testing.assert_array_equal(replayed.routed_experts[:, :width], own.routed_experts[:, :width])


def test_replay_brings_trainer_logprobs_closer_to_the_samplers(sampled, trainer_forwards):
  # Same params, trainer in bf16: without replay the tokens after a routing flip differ by up
  # to ~1 nat; with replay the largest gap is bf16 rounding (~0.03). Mean and max must not grow.
  _, _, out, _ = sampled
  width, n = out.prompt_tokens.shape[1], out.tokens.shape[1]
  gaps = []
  for forward in trainer_forwards[:2]:  # own routing, then replay
    logits = forward.logits[:, width - 1:width + n - 1]
    logprobs = sampling.token_logprobs(logits, out.tokens, 1.0)
    gaps.append(np.abs(np.asarray(logprobs) - np.asarray(out.logprobs)))
  without, with_replay = gaps
  assert with_replay.max() <= without.max() and with_replay.mean() <= without.mean()
  assert without.max() > 3 * with_replay.max()  # the flips dominate the mismatch here
