"""The tiny model with the Pallas lightning kernel equals the jnp blockwise path.

On CPU the kernel runs in interpret mode, on GPU compiled (the `gpu` test). float32 throughout
(on GPU the rest of the model's matmuls too: XLA's default float32 precision there is TF32, whose
rounding would amplify the paths' tiny differences): the two paths differ in summation order
only, so logits, loss and every gradient agree to 1e-5 relative to their largest magnitude.
"""

import jax
import jax.numpy as jnp
import pytest

from m1jax import config, generate, model

TOL = 1e-5


def _loss_and_grads(cfg, params, tokens):
  def loss(p):
    out = model.forward(cfg, p, tokens)
    return (jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0]) + out.aux_loss,
            out.logits)
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, grads


def _compare(cfg):
  params = model.init(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, cfg.vocab_size)
  ref = _loss_and_grads(cfg.replace(lightning_impl="blockwise"), params, tokens)
  got = _loss_and_grads(cfg.replace(lightning_impl="pallas"), params, tokens)
  assert abs(float(got[0] - ref[0])) <= TOL * abs(float(ref[0]))
  assert float(jnp.max(jnp.abs(got[1] - ref[1]))) <= TOL * float(jnp.max(jnp.abs(ref[1])))
  for g, r in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2])):
    assert float(jnp.max(jnp.abs(g - r))) <= TOL * max(float(jnp.max(jnp.abs(r))), 1e-12)


def test_tiny_model_with_kernel_equals_jnp_path_interpret():
  _compare(config.preset("tiny", dtype="float32", num_hidden_layers=2, attn_type_list=(0, 1)))


@pytest.mark.gpu
def test_tiny_model_with_kernel_equals_jnp_path_on_gpu():
  with jax.default_matmul_precision("highest"):
    _compare(config.preset("tiny", dtype="float32"))


def _greedy_decode(cfg, params, prompts):
  out = generate.generate(cfg, params, prompts, generate.GenerateConfig(
      max_new_tokens=6, sampling=generate.SamplingConfig(temperature=0.0)))
  return out.tokens, out.logprobs


def _compare_decode(cfg):
  """Greedy generation (prefill + decode steps on the stacked lightning states) through the
  decode kernel, which updates each layer's row of the stack in place, equals the jnp step."""
  params = model.init(cfg, jax.random.key(0))
  prompts = [[3, 5, 7, 9, 11], [2, 4], [6, 1, 8]]
  ref_tokens, ref_logprobs = _greedy_decode(cfg.replace(lightning_impl="blockwise"), params,
                                            prompts)
  tokens, logprobs = _greedy_decode(cfg.replace(lightning_impl="pallas"), params, prompts)
  assert (tokens == ref_tokens).all()
  assert float(jnp.max(jnp.abs(logprobs - ref_logprobs))) <= TOL * float(
      jnp.max(jnp.abs(ref_logprobs)))


def test_tiny_model_decode_with_kernel_equals_jnp_path_interpret():
  # Two groups of (lightning, lightning, softmax): four rows of the stacked states.
  _compare_decode(config.preset("tiny", dtype="float32", num_hidden_layers=6,
                                attn_type_list=(0, 0, 1, 0, 0, 1)))


@pytest.mark.gpu
def test_tiny_model_decode_with_kernel_equals_jnp_path_on_gpu():
  with jax.default_matmul_precision("highest"):
    _compare_decode(config.preset("tiny", dtype="float32"))
