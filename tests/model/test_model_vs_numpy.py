"""The Flax model against an independent float64 numpy transcription of DESIGN.md's math.

This is the check for what transformers cannot check: partial RoPE (rotary_dim < head_dim), the
original slope convention, and pre-norm residuals. float32 model vs float64 reference: the tiny
model's logits agree to 1e-4 relative to their largest magnitude (fp32 rounding over 4 layers).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import config, model

TOL = 1e-4


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
  return x / (1 + np.exp(-x))


def _rope(x, pos, rot, theta):  # x [T, N, D], NeoX half split over the first `rot` dims
  half = rot // 2
  freq = theta ** (-np.arange(0, rot, 2) / rot)
  ang = pos[:, None] * freq[None]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = x[..., :half], x[..., half:rot]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


def reference_logits(cfg, params, tokens):
  """One sequence, token by token for the lightning recurrence. tokens [T] -> logits [T, V]."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  h_, d = cfg.num_attention_heads, cfg.head_dim
  t = len(tokens)
  x = p["embed"][tokens]
  for layer in range(cfg.num_hidden_layers):
    lp = model.layer_params(cfg, p, layer)
    h = _rms(x, lp["input_norm"]["scale"], cfg.rms_norm_eps)
    a = lp["attn"]
    if cfg.is_lightning[layer]:
      qkv = _silu(np.einsum("te,ehf->thf", h, a["qkv"]))
      q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
      denominator = cfg.num_hidden_layers - 1 + (
          1e-5 if cfg.slope_convention == "transformers" else 0)
      slope = 2.0 ** (-8 * (np.arange(h_) + 1) / h_) * (1 - layer / denominator + 1e-5)
      state = np.zeros((h_, d, d))
      o = np.zeros((t, h_, d))
      for i in range(t):
        state = np.exp(-slope)[:, None, None] * state + np.einsum("hd,he->hde", k[i], v[i])
        o[i] = np.einsum("hd,hde->he", q[i], state)
      o = _rms(o.reshape(t, h_ * d), a["norm"]["scale"].reshape(-1), cfg.lightning_norm_eps)
      gate = 1 / (1 + np.exp(-np.einsum("te,ehd->thd", h, a["gate"]).reshape(t, -1)))
      attn = (o * gate) @ a["out"].reshape(h_ * d, -1)
      alpha, beta = cfg.layernorm_linear_attention_alpha, cfg.layernorm_linear_attention_beta
    else:
      rot = cfg.effective_rotary_dim
      pos = np.arange(t, dtype=np.float64)
      q = _rope(np.einsum("te,ehd->thd", h, a["q"]), pos, rot, cfg.rope_theta)
      k = _rope(np.einsum("te,ehd->thd", h, a["k"]), pos, rot, cfg.rope_theta)
      v = np.einsum("te,ehd->thd", h, a["v"])
      group = h_ // cfg.num_key_value_heads
      k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
      scores = np.einsum("ihd,jhd->hij", q, k) * d ** -0.5
      scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      attn = np.einsum("hij,jhd->ihd", probs, v).reshape(t, -1) @ a["o"].reshape(h_ * d, -1)
      alpha, beta = cfg.layernorm_full_attention_alpha, cfg.layernorm_full_attention_beta
    x = (h if cfg.postnorm else x) * alpha + attn * beta
    h = _rms(x, lp["post_attn_norm"]["scale"], cfg.rms_norm_eps)
    m = lp["moe"]
    logits = h @ m["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    moe = np.zeros_like(h)
    for i in range(t):
      top = np.argsort(-probs[i])[:cfg.num_experts_per_tok]
      weights = probs[i, top] / probs[i, top].sum()
      for e, w in zip(top, weights):
        moe[i] += w * ((_silu(h[i] @ m["w1"][e]) * (h[i] @ m["w3"][e])) @ m["w2"][e])
    x = (h if cfg.postnorm else x) * cfg.layernorm_mlp_alpha + moe * cfg.layernorm_mlp_beta
  x = _rms(x, p["final_norm"]["scale"], cfg.rms_norm_eps)
  return x @ p["lm_head"]


def _perturbed_params(cfg, seed):
  """Random init, with norm scales moved off 1 so that a wrong norm weight would show."""
  params = model.init(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten_with_path(params)
  key = jax.random.key(seed + 1)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    if "scale" in jax.tree_util.keystr(path):
      leaf = leaf + 0.2 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("changes", [
    dict(),  # tiny preset: rotary_dim 8 of head_dim 16, original slopes
    dict(postnorm=False, attn_type_list=(1, 0, 0, 1), num_key_value_heads=1, num_experts_per_tok=1,
         slope_convention="transformers", rope_full_head=True, layernorm_mlp_beta=0.6),
])
def test_logits_match_numpy_reference(changes):
  cfg = config.preset("tiny", dtype="float32", block_size=8, **changes)
  params = _perturbed_params(cfg, 0)
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 19), 0, cfg.vocab_size))
  got = np.asarray(
      jax.jit(lambda p, t: model.forward(cfg, p, t).logits)(params, jnp.asarray(tokens)))
  for b in range(tokens.shape[0]):
    ref = reference_logits(cfg, params, tokens[b])
    assert np.max(np.abs(got[b] - ref)) / np.max(np.abs(ref)) <= TOL
