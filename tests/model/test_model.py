"""Model behaviour: MoE implementations, padding, remat, dtypes, parameter counts, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import config, generate, model, sharding
from m1jax.model import common, moe
from m1jax.model.lightning import decay_slopes

# float32 everywhere below; implementations differ only in summation order.
TOL = 1e-5


forward = jax.jit(model.forward, static_argnums=0)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module")
def tiny():
  cfg = config.preset("tiny", dtype="float32")
  return cfg, model.init(cfg, jax.random.key(0))


def _tokens(cfg, shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def _experts(seed, n=40, e=16, i=24, x=6, k=2):
  ks = jax.random.split(jax.random.key(seed), 5)
  h = jax.random.normal(ks[0], (n, e))
  router = jax.random.normal(ks[1], (e, x))
  w1, w3 = (jax.random.normal(ks[j], (x, e, i)) * 0.2 for j in (2, 3))
  w2 = jax.random.normal(ks[4], (x, i, e)) * 0.2
  _, weights, experts = moe.route(h, router, k)
  return h, weights, experts, w1, w3, w2


def test_dropless_gradient_gathers_where_indexing_would_scatter_add():
  # The sort and unsort are permutations with known inverses: their gradients are gathers (no
  # scatter-add, which is atomics on a GPU); only the forward's bincount scatter-adds.
  h, weights, experts, w1, w3, w2 = _experts(2)
  f = lambda h, w2: jnp.sum(moe.experts_dropless(h, weights, experts, w1, w3, w2, jnp.float32))
  forward_only = str(jax.make_jaxpr(f)(h, w2)).count("scatter-add")
  with_grad = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(h, w2)).count("scatter-add")
  assert with_grad == forward_only == 1


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("bte,ehd->bthd", (2, 5, 8), (8, 3, 4)), ("bthd,hde->bte", (2, 5, 3, 4), (3, 4, 8)),
    ("nxi,xie->nxe", (6, 3, 4), (3, 4, 8))])
def test_matmul_gradients_in_operand_dtype_equal_autodiff(equation, x_shape, w_shape):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  ct = jax.random.normal(jax.random.key(2), jnp.einsum(equation, x, w).shape)
  plain = lambda x, w: jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
  _, ref_vjp = jax.vjp(plain, x, w)
  got, vjp = jax.vjp(functools.partial(common._accumulating_einsum, equation), x, w)
  assert _rel(got, plain(x, w)) <= 1e-6
  for a, b in zip(vjp(ct), ref_vjp(ct)):
    assert a.shape == b.shape and _rel(a, b) <= 1e-6


def test_matmul_gradients_multiply_bfloat16_on_a_gpu():
  # Lowered for CUDA: the forward and both gradient products take bfloat16 operands (autodiff of
  # the float32-accumulating einsum multiplies float32 there).
  x = jnp.ones((2, 5, 8), jnp.bfloat16)
  w = jnp.ones((8, 3, 4), jnp.bfloat16)
  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32))
  def operand_types(fn):
    text = jax.jit(jax.grad(loss(fn), argnums=(0, 1))).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    return {line.split(":")[-1].split("->")[0].strip() for line in text.splitlines()
            if "stablehlo.dot_general" in line}
  types = operand_types(functools.partial(common._accumulating_einsum, "bte,ehd->bthd"))
  assert len(types) == 2 and all("f32" not in t for t in types), types
  autodiff = operand_types(lambda x, w: jnp.einsum("bte,ehd->bthd", x, w,
                                                   preferred_element_type=jnp.float32
                                                   ).astype(jnp.bfloat16))
  assert all("f32" in t for t in autodiff), autodiff


@pytest.mark.parametrize("equation", ["bte,ehd", "bte,ehd,hd->bt", "btz,ehd->bthd"])
def test_matmul_rejects_what_is_not_a_matmul(equation):
  with pytest.raises(ValueError, match="matmul"):
    common.transposed_equations(equation)


def test_model_gradients_with_operand_dtype_products_equal_autodiff(tiny, monkeypatch):
  cfg, params = tiny
  tokens = _tokens(cfg, (2, 9))
  ref_loss, ref_grad = _loss_and_grad(cfg, params, tokens)
  monkeypatch.setattr(common, "gradients_in_operand_dtype", lambda: True)
  got_loss, got_grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(
      cfg, params, tokens)
  assert abs(float(got_loss - ref_loss)) <= TOL * abs(float(ref_loss))
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
    assert float(jnp.max(jnp.abs(a - b))) <= TOL * max(float(jnp.max(jnp.abs(b))), 1e-6)


def test_router_renormalises_top_k():
  h, weights, experts, *_ = _experts(0)
  np.testing.assert_allclose(np.sum(np.asarray(weights), -1), 1.0, rtol=1e-6)
  assert experts.shape == (40, 2) and np.all(np.asarray(experts[:, 0] != experts[:, 1]))


def test_dropless_equals_dense_reference_values_and_gradients():
  h, weights, experts, w1, w3, w2 = _experts(1)

  def run(fn, h, w1, w3, w2):
    return fn(h, weights, experts, w1, w3, w2, jnp.float32)

  dense = run(moe.experts_dense, h, w1, w3, w2)
  ragged = run(moe.experts_dropless, h, w1, w3, w2)
  assert _rel(ragged, dense) <= TOL
  cot = jax.random.normal(jax.random.key(5), dense.shape)
  g_dense = jax.grad(lambda *a: jnp.sum(run(moe.experts_dense, *a) * cot),
                     argnums=(0, 1, 2, 3))(h, w1, w3, w2)
  g_ragged = jax.grad(lambda *a: jnp.sum(run(moe.experts_dropless, *a) * cot),
                      argnums=(0, 1, 2, 3))(h, w1, w3, w2)
  for a, b in zip(g_ragged, g_dense):
    assert _rel(a, b) <= TOL


def test_gate_and_up_fused_or_apart_are_equal():
  """[w1 | w3] as one grouped matmul (many rows) and w1, w3 as two (decode-sized rows) give
  the same values and gradients: each output element is the same dot product."""
  h, weights, experts, w1, w3, w2 = _experts(3)

  def run(fuse_rows, h, w1, w3, w2):
    return moe.experts_dropless(h, weights, experts, w1, w3, w2, jnp.float32,
                                fuse_rows=fuse_rows)

  cot = jax.random.normal(jax.random.key(6), h.shape)
  fused, apart = (jax.value_and_grad(lambda *a, r=r: jnp.sum(run(r, *a) * cot),
                                     argnums=(0, 1, 2, 3))(h, w1, w3, w2) for r in (0, 10**9))
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(apart)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_capacity_factor_drops_only_when_capacity_is_short():
  h, weights, experts, w1, w3, w2 = _experts(2)
  dense = moe.experts_dense(h, weights, experts, w1, w3, w2, jnp.float32)
  roomy, dropped = moe.experts_capacity(h, weights, experts, w1, w3, w2, jnp.float32, 100.0)
  assert float(dropped) == 0 and _rel(roomy, dense) <= TOL
  tight, dropped = moe.experts_capacity(h, weights, experts, w1, w3, w2, jnp.float32, 0.5)
  # capacity = ceil(0.5 * 40 * 2 / 6) = 7 slots per expert: 42 of 80 assignments fit at most.
  assert float(dropped) >= 80 - 42
  # Tokens whose assignments all fit are untouched; a dropped assignment just loses its term.
  counts = np.zeros(6, int)
  kept = np.zeros((40, 2), bool)
  for choice in range(2):
    for n in range(40):
      e = int(experts[n, choice])
      kept[n, choice] = counts[e] < 7
      counts[e] += 1
  expected = moe.experts_dense(h, weights * kept, experts, w1, w3, w2, jnp.float32)
  assert _rel(tight, expected) <= TOL


def test_aux_loss_is_switch_style_over_pooled_layers():
  assign = jnp.array([[3.0, 1.0], [2.0, 2.0]])  # 2 layers, 2 experts, 2 tokens each, top-1
  probs = jnp.array([[1.5, 0.5], [1.0, 1.0]])
  stats = moe.RouterStats(assign, probs, jnp.array([2.0, 2.0]) * 2 / 2, jnp.zeros(2))
  # f = [5, 3] / 4 tokens, P = [2.5, 1.5] / 4 -> 2 * (5*2.5 + 3*1.5) / 16
  np.testing.assert_allclose(float(moe.aux_loss(stats)), 2 * (5 * 2.5 + 3 * 1.5) / 16, rtol=1e-6)


def test_moe_impls_agree_in_the_model(tiny):
  cfg, params = tiny
  tokens = _tokens(cfg, (2, 19))
  outs = {impl: forward(cfg.replace(moe_impl=impl), params, tokens).logits
          for impl in ("ragged", "dense")}
  outs["capacity"] = forward(cfg.replace(moe_capacity_factor=8.0), params, tokens).logits
  assert _rel(outs["ragged"], outs["dense"]) <= TOL
  assert _rel(outs["capacity"], outs["dense"]) <= TOL


def test_gpu_decode_steps_compute_every_expert_up_to_moe_dense_decode_rows(tiny, monkeypatch):
  """On a GPU, one token per row and at most moe_dense_decode_rows rows: the dense experts (no
  sort); more rows, more tokens per row or another backend: the grouped path; a capacity
  factor: its capacity dispatch. (Traced only: the backend is patched, nothing is lowered.)"""
  cfg, params = tiny
  tokens = _tokens(cfg, (6, 1))

  def sorts(c, t):
    jaxpr = jax.make_jaxpr(lambda p: model.forward(c, p, t).logits)(params)
    return " sort[" in str(jaxpr)

  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert sorts(cfg.replace(moe_dense_decode_rows=6), tokens)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not sorts(cfg.replace(moe_dense_decode_rows=6), tokens)
  assert sorts(cfg.replace(moe_dense_decode_rows=5), tokens)
  assert sorts(cfg.replace(moe_dense_decode_rows=0), tokens)
  assert sorts(cfg.replace(moe_dense_decode_rows=12), tokens.reshape(3, 2))
  capacity = str(jax.make_jaxpr(lambda p: model.forward(
      cfg.replace(moe_dense_decode_rows=6, moe_capacity_factor=2.0), p, tokens).logits)(params))
  assert " cumsum[" in capacity  # the capacity dispatch's slots
  with pytest.raises(ValueError, match="moe_dense_decode_rows"):
    cfg.replace(moe_dense_decode_rows=-1)


def test_fused_gate_up_weights_give_the_same_forward(tiny):
  """model.fuse_gate_up: every expert's [w1, w3] stacked for the dense experts' one gate-and-up
  product: the same dot products, so the logits agree to float32 rounding; the forward reads
  the stacked weights (zeroed, the logits change), stacked or unstacked by layer group."""
  cfg, params = tiny
  cfg = cfg.replace(moe_impl="dense")
  tokens = _tokens(cfg, (3, 7))
  expect = forward(cfg, params, tokens).logits
  fused = model.fuse_gate_up(params)
  moe_params = fused["layers"]["layer_0"]["moe"]
  assert moe_params["w13"].shape == moe_params["w1"].shape[:-1] + (2, cfg.intermediate_size)
  np.testing.assert_allclose(forward(cfg, fused, tokens).logits, expect, rtol=0, atol=1e-6)
  split = model.unstack_layer_groups(cfg, fused)
  np.testing.assert_allclose(forward(cfg, split, tokens).logits, expect, rtol=0, atol=1e-6)
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if path[-1].key == "w13" else x, fused)
  assert _rel(forward(cfg, zeroed, tokens).logits, expect) > 1e-3


@pytest.mark.gpu
def test_gpu_dense_decode_step_equals_the_grouped_path():
  """A bf16 decode-shaped forward (64 rows x 1 token) through the dense experts against the
  grouped GEMMs: the same dot products with float32 accumulation in other kernels (another
  summation order), each rounded to bf16, so within a few bf16 ulps of the largest logit."""
  cfg = config.preset("tiny", dtype="bfloat16", lightning_impl="blockwise")
  params = model.init(cfg, jax.random.key(0))
  tokens = _tokens(cfg, (64, 1))
  dense = forward(cfg, params, tokens).logits.astype(jnp.float32)
  grouped = forward(cfg.replace(moe_dense_decode_rows=0), params, tokens).logits
  assert _rel(dense, grouped.astype(jnp.float32)) <= 4 * 2.0 ** -8
  fused = forward(cfg, model.fuse_gate_up(params), tokens).logits  # the decode loop's weights
  assert _rel(fused.astype(jnp.float32), grouped.astype(jnp.float32)) <= 4 * 2.0 ** -8


def test_left_padding_matches_unpadded(tiny):
  """Padding gets zero q/k/v (lightning), is masked as keys (softmax) and shifts no position.
  (The tokens of test_moe_impls_agree_in_the_model: its unpadded forward is compiled.)"""
  cfg, params = tiny
  tokens = _tokens(cfg, (2, 19))
  pad = 6
  padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), tokens], axis=1)
  mask = jnp.broadcast_to(jnp.arange(19 + pad)[None] >= pad, padded.shape)
  ref = forward(cfg, params, tokens).logits
  got = forward(cfg, params, padded, token_mask=mask).logits[:, pad:]
  assert _rel(got, ref) <= TOL


def _loss(cfg, params, tokens):
  out = model.forward(cfg, params, tokens)
  return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + out.aux_loss


# Module level: both policies compare with one compiled program without remat.
_loss_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "save_matmuls"])
def test_remat_changes_nothing(tiny, policy):
  cfg, params = tiny
  tokens = _tokens(cfg, (2, 9))
  ref_loss, ref_grad = _loss_and_grad(cfg, params, tokens)
  got_loss, got_grad = _loss_and_grad(cfg.replace(remat_policy=policy), params, tokens)
  assert abs(float(got_loss - ref_loss)) <= TOL * abs(float(ref_loss))
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
    assert float(jnp.max(jnp.abs(a - b))) <= TOL * max(float(jnp.max(jnp.abs(b))), 1e-6)


def _residual_bytes(cfg, params, tokens):
  """(all, float32) bytes of what the backward of the forward keeps (the vjp's residuals,
  traced, not computed)."""
  loss = lambda p: jnp.sum(model.forward(cfg, p, tokens).hidden.astype(jnp.float32) ** 2)
  leaves = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params))
  nbytes = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
  return nbytes(leaves), nbytes([x for x in leaves if x.dtype == jnp.float32])


def test_save_matmuls_keeps_only_the_named_bfloat16_outputs():
  """remat_policy="save_matmuls" at bf16 compute: no float32 residual beyond what "full" keeps
  (the float32 masters and the layers' inputs), and a fraction of "none"'s activations."""
  cfg = config.preset("tiny", dtype="bfloat16")
  params = model.init(cfg, jax.random.key(0))
  tokens = _tokens(cfg, (2, 128))
  kept = {p: _residual_bytes(cfg.replace(remat_policy=p), params, tokens)
          for p in ("none", "save_matmuls", "full")}
  assert kept["save_matmuls"][1] == kept["full"][1]
  # Beyond "full" (the named bf16 outputs): 2.0 MB against 9.4 MB (2026-12-03).
  extra = kept["save_matmuls"][0] - kept["full"][0]
  assert 0 < extra < (kept["none"][0] - kept["full"][0]) / 3


def test_unrolled_layer_scan_changes_nothing():
  """layer_scan_unroll=2 (straight-line code over both groups) keeps the parameter tree, the
  loss, every gradient and a cached greedy decode of the loop over groups."""
  cfg = config.preset("tiny", dtype="float32", num_hidden_layers=6,
                      attn_type_list=(0, 0, 1, 0, 0, 1))
  unrolled = cfg.replace(layer_scan_unroll=2)
  assert cfg.num_layer_groups == 2
  params = model.init(cfg, jax.random.key(0))
  assert (jax.tree.structure(model.init(unrolled, jax.random.key(0)))
          == jax.tree.structure(params))
  tokens = _tokens(cfg, (2, 9))
  loops = lambda c: forward.lower(c, params, tokens).as_text().count("stablehlo.while")
  assert loops(unrolled) == loops(cfg) - 1  # the layer loop is gone, the lightning blocks' stay
  ref_loss, ref_grad = _loss_and_grad(cfg, params, tokens)
  got_loss, got_grad = _loss_and_grad(unrolled, params, tokens)
  assert abs(float(got_loss - ref_loss)) <= TOL * abs(float(ref_loss))
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
    assert float(jnp.max(jnp.abs(a - b))) <= TOL * max(float(jnp.max(jnp.abs(b))), 1e-6)
  run = lambda c: generate.generate(c, params, [[3, 5, 7, 9], [2, 4]], generate.GenerateConfig(
      max_new_tokens=4, sampling=generate.SamplingConfig(temperature=0.0)))
  ref, got = run(cfg), run(unrolled)
  assert (got.tokens == ref.tokens).all()
  assert _rel(got.logprobs, ref.logprobs) <= TOL
  # Slot refill decodes from one array per group and per KV layer when unrolled.
  refill = lambda c: generate.generate(
      c, params, [[3, 5, 7, 9], [2, 4], [1], [6, 6, 6]], generate.GenerateConfig(
          max_new_tokens=5, slots=2, refill_rows=1, repetition_window=0,
          sampling=generate.SamplingConfig(temperature=1.0)), key=jax.random.key(2))
  ref, got = refill(cfg), refill(unrolled)
  assert (got.tokens == ref.tokens).all() and (got.lengths == ref.lengths).all()
  assert _rel(got.logprobs, ref.logprobs) <= TOL


def test_unstacked_layer_groups_equal_the_stacked_params():
  """model.unstack_layer_groups: the same forward (logits, router stats, hidden states, routed
  experts, a routing replay) and the same cached decode step from one array per layer group."""
  cfg = config.preset("tiny", dtype="float32", num_hidden_layers=6,
                      attn_type_list=(0, 0, 1, 0, 0, 1))
  params = model.init(cfg, jax.random.key(0))
  split = model.unstack_layer_groups(cfg, params)
  assert set(split) - set(params) == {"layers_0", "layers_1"} and "layers" not in split
  assert jax.tree.map(jnp.shape, split["layers_1"]) == jax.tree.map(
      lambda x: x.shape[1:], params["layers"])
  for layer in (2, 4):
    for a, b in zip(jax.tree.leaves(model.layer_params(cfg, split, layer)),
                    jax.tree.leaves(model.layer_params(cfg, params, layer))):
      np.testing.assert_array_equal(a, b)
  tokens = _tokens(cfg, (2, 9))
  mask = jnp.arange(9)[None, :] >= jnp.array([[0], [3]])
  run = jax.jit(functools.partial(model.forward, cfg, token_mask=mask, return_hidden_states=True,
                                  return_experts=True))
  ref, got = run(params, tokens), run(split, tokens)
  replay = model.RoutingReplay(jnp.roll(ref.routed_experts, 1, axis=2), mask)
  replayed = [jax.jit(functools.partial(model.forward, cfg, token_mask=mask,
                                        routing_replay=replay))(p, tokens).logits
              for p in (params, split)]
  cache = model.init_cache(cfg, 2, 10)
  prefill = [jax.jit(functools.partial(model.forward, cfg, token_mask=mask, fresh_cache=True))(
      p, tokens, cache=cache).cache for p in (params, split)]
  step = [forward(cfg, p, tokens[:, :1], positions=jnp.array([[9], [6]]), cache=c)
          for p, c in zip((params, split, split), (prefill[0], prefill[1],
                                                   model.unstack_cache(prefill[1])))]
  assert isinstance(step[2].cache.keys, tuple) and len(step[2].cache.values) == 2
  pairs = [(got.logits, ref.logits), (got.routed_experts, ref.routed_experts),
           (replayed[1], replayed[0])]
  for other in step[1:]:  # stacked and per-layer KV arrays
    pairs += [(other.logits, step[0].logits),
              (other.cache.lightning_states, step[0].cache.lightning_states),
              (jnp.stack(other.cache.keys), step[0].cache.keys),
              (jnp.stack(other.cache.values), step[0].cache.values)]
  pairs += list(zip(jax.tree.leaves(got.router_stats), jax.tree.leaves(ref.router_stats)))
  pairs += list(zip(got.hidden_states, ref.hidden_states))
  for a, b in pairs:
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="already unstacked"):
    model.unstack_layer_groups(cfg, split)
  with pytest.raises(ValueError, match="one array per layer group"):
    model.forward(cfg, params, tokens[:, :1], cache=model.unstack_cache(prefill[0]))


def test_layer_scan_unroll_must_be_positive():
  with pytest.raises(ValueError, match="layer_scan_unroll"):
    config.preset("tiny", layer_scan_unroll=0)


def test_dtypes(tiny):
  _, params = tiny
  cfg = config.preset("tiny", dtype="bfloat16", lm_head_dtype="float32")
  out = forward(cfg, params, _tokens(cfg, (1, 5)))
  assert out.hidden.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
  out = forward(cfg.replace(lm_head_dtype="bfloat16"), params, _tokens(cfg, (1, 5)))
  assert out.logits.dtype == jnp.bfloat16


def test_456b_preset_counts_without_allocating():
  cfg = config.preset("minimax-m1-456b")
  counts = model.param_counts(cfg)
  assert counts["total"] == 456_089_655_296  # 456.09B (docs/paper.md)
  assert counts["active_per_token"] == 45_944_920_064  # 45.94B excluding embedding and LM head
  assert counts["active_with_lm_head"] == 47_174_113_280  # 47.17B
  assert counts["total"] * 2 == 912_179_310_592  # bf16 bytes; the published file adds decay buffers
  assert counts["lightning_layers"] + counts["softmax_layers"] + counts["moe"] + \
      counts["embedding"] + counts["lm_head"] + counts["final_norm"] == counts["total"]


def test_params_do_not_depend_on_the_kernels_choice(monkeypatch):
  """On a (pretended) Hopper GPU with every lightning sweep forced onto the Mosaic kernel, which
  needs T a multiple of 64, the params' shapes (traced on one token) and specs still come out,
  equal to the default config's."""
  from pallas_kernels.lightning import kernel  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(kernel, "is_hopper", lambda: True)
  base = config.preset("tiny", dtype="bfloat16", attention_impl="xla")
  forced = base.replace(lightning_kernel=config.KernelConfig(forward_impl="mosaic",
                                                             backward_impl="mosaic"))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), model.abstract_params(forced)) == (
      jax.tree.map(lambda x: (x.shape, x.dtype), model.abstract_params(base)))
  assert model.logical_axes(forced) == model.logical_axes(base)


def test_small_preset_is_within_its_size_class():
  counts = model.param_counts(config.preset("small"))
  assert 0.5e9 <= counts["total"] <= 1.0e9


def test_every_param_has_logical_axes(tiny):
  cfg, params = tiny
  specs = model.logical_axes(cfg)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(flat_specs) == len(jax.tree.leaves(params))
  for spec, leaf in zip(flat_specs, jax.tree.leaves(params)):
    assert len(spec) == leaf.ndim


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 2, "expert": 2},
                                        {"data": 2, "fsdp": 4}])
def test_sharded_forward_equals_single_device(tiny, mesh_shape):
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
  cfg, params = tiny
  tokens = _tokens(cfg, (8, 19))
  ref = forward(cfg, params, tokens)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
  shardings = sharding.param_shardings(model.logical_axes(cfg), params, mesh)
  sharded_params = jax.device_put(params, shardings)
  assert any(len(leaf.sharding.device_set) > 1 and not leaf.sharding.is_fully_replicated
             for leaf in jax.tree.leaves(sharded_params))
  with sharding.activate(mesh):
    out = jax.jit(lambda p, t: model.forward(cfg, p, t))(
        sharded_params, jax.device_put(tokens, sharding.batch_sharding(mesh)))
  assert _rel(out.logits, ref.logits) <= TOL
  np.testing.assert_allclose(float(out.aux_loss), float(ref.aux_loss), rtol=1e-6)


def test_make_mesh_validation():
  with pytest.raises(ValueError, match="not among"):
    sharding.make_mesh({"pipeline": 2})
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh({"fsdp": 2, "tensor": 3}, jax.devices()[:8])
  assert sharding.make_mesh({"tensor": 2, "fsdp": -1}, jax.devices()[:8]).shape["fsdp"] == 4


def test_decay_slopes_match_the_formula():
  h, num_layers = 8, 10
  for layer in (0, 4, 9):
    expected_original = [2 ** (-8 * (i + 1) / h) * (1 - layer / (num_layers - 1) + 1e-5)
                         for i in range(h)]
    expected_hf = [2 ** (-8 * (i + 1) / h) * (1 - layer / (num_layers - 1 + 1e-5) + 1e-5)
                   for i in range(h)]
    np.testing.assert_allclose(decay_slopes(h, layer, num_layers), expected_original, rtol=1e-6)
    np.testing.assert_allclose(decay_slopes(h, layer, num_layers, "transformers"), expected_hf,
                               rtol=1e-6)
  # Released model: layer 0 decays span [0.400, 0.9961] (docs/paper.md).
  decays = np.exp(-np.asarray(decay_slopes(64, 0, 80)))
  assert (decays.min() == pytest.approx(0.400, abs=1e-3)
          and decays.max() == pytest.approx(0.9961, abs=1e-4))


def test_packed_attention_equals_the_masked_reference():
  """The flash-attention path for padded rows (rotate each row to start at its first real token,
  attend with sequence lengths, rotate back) equals masked attention at every real position.
  Here with XLA's implementation of sequence lengths (cuDNN's on a GPU: the gpu test of the
  model); float32, summation order only: 1e-6."""
  from m1jax.model import attention  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 3)
  b, t, h, kv, d = 4, 13, 4, 2, 8
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, kv, d)) for key in keys[1:])
  starts, ends = jnp.array([0, 3, 5, 0]), jnp.array([13, 13, 11, 9])  # left and right padding
  mask = (jnp.arange(t)[None] >= starts[:, None]) & (jnp.arange(t)[None] < ends[:, None])
  want = attention.causal_attention(q, k, v, mask, d ** -0.5, "xla")
  got = attention._packed_attention(q, k, v, mask, d ** -0.5, "xla")  # pylint: disable=protected-access
  assert np.all(np.isfinite(got))
  real = np.asarray(mask)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_gpu_cudnn_packed_attention_equals_xla_masked():
  """cuDNN flash attention on left- and right-padded rows (the RL batches) vs XLA's masked
  attention, bf16 inputs: outputs rounded to bf16 (2^-8 relative) after float32 accumulation
  in another order, so 1e-2 of the largest output; gradients likewise."""
  from m1jax.model import attention  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(1), 4)
  b, t, h, kv, d = 4, 300, 8, 2, 128
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
  k, v, do = (jax.random.normal(key, shape, jnp.bfloat16)
              for key, shape in zip(keys[1:], ((b, t, kv, d), (b, t, kv, d), (b, t, h, d))))
  starts, ends = jnp.array([0, 37, 100, 0]), jnp.array([300, 300, 250, 64])
  mask = (jnp.arange(t)[None] >= starts[:, None]) & (jnp.arange(t)[None] < ends[:, None])
  real = np.asarray(mask)[:, :, None, None]
  do = jnp.where(real, do, 0)  # in the model nothing downstream reads padded positions

  def run(impl):
    out, vjp = jax.vjp(lambda q, k, v: attention.causal_attention(q, k, v, mask, d ** -0.5, impl),
                       q, k, v)
    return (out, *vjp(do))

  want, got = jax.jit(lambda: run("xla"))(), jax.jit(lambda: run("cudnn"))()
  for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
    g = np.where(real, np.asarray(g, np.float32), 0)
    w = np.where(real, np.asarray(w, np.float32), 0)
    assert np.abs(g - w).max() <= 1e-2 * np.abs(w).max(), name


def test_lm_head_precision_is_a_checked_knob():
  """Every lm_head_precision the config accepts reaches the head; a float32 head with the
  3- or 6-pass bf16 algorithm gives the float32 logits to within the algorithm's error (on CPU,
  XLA computes both in plain float32); an unknown name is rejected naming the field."""
  cfg = config.preset("tiny")
  hidden = jax.random.normal(jax.random.key(0), (2, 3, cfg.hidden_size))
  head = jax.random.normal(jax.random.key(1), (cfg.hidden_size, cfg.vocab_size))
  want = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
  for precision, bound in (("highest", 2.0 ** -20), ("bf16_6x", 2.0 ** -20),
                           ("bf16_3x", 2.0 ** -14)):
    got = jax.jit(lambda h, w, p=precision: model.lm_head_logits(
        cfg.replace(lm_head_precision=p), h, w))(hidden, head)
    assert np.linalg.norm(got - want) <= bound * np.linalg.norm(want), precision
  with pytest.raises(ValueError, match="lm_head_precision"):
    config.preset("tiny", lm_head_precision="bf16_9x")


@pytest.mark.gpu
def test_gpu_lm_head_precisions_against_float64():
  """On the GPU each algorithm's error against float64, small-preset head shapes: 6 bf16
  passes and 3 tf32 passes keep float32's 24-bit operands (error within 4x of true
  float32's, itself at most about sqrt(E) 2^-24 = 2^-19 from float32 accumulation over E = 1024
  terms), 3 bf16 passes keep about 16 bits (2^-14 of the norm)."""
  e, v = 1024, 32768
  hidden = jax.random.normal(jax.random.key(0), (256, e))
  head = 0.02 * jax.random.normal(jax.random.key(1), (e, v))
  want = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
  errors = {}
  for precision in ("highest", "bf16_3x", "bf16_6x", "tf32_3x"):
    cfg = config.preset("small", lm_head_precision=precision)
    got = np.asarray(jax.jit(lambda h, w, c=cfg: model.lm_head_logits(c, h, w))(hidden, head))
    errors[precision] = np.linalg.norm(got - want) / np.linalg.norm(want)
  print(errors)
  assert errors["highest"] <= 2.0 ** -18
  for precision in ("bf16_6x", "tf32_3x"):
    assert errors[precision] <= 4 * errors["highest"], (precision, errors)
  assert errors["bf16_3x"] <= 2.0 ** -14, errors
