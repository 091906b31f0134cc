"""Shared pieces of the model's modules: partitioned parameters and sharding constraints."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Activation axis names (parameter axis names are listed with each parameter).
BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, KV_HEADS = "activation_heads", "activation_kv_heads"


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str],
          stddev: float, dtype) -> jax.Array:
  """A normal(0, stddev) parameter annotated with logical axis names."""
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev), tuple(axes))
  return module.param(name, init, tuple(shape), dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op without axis rules in scope)."""
  return nn.with_logical_constraint(x, tuple(axes))


# Names of the values remat_policy="save_matmuls" keeps for the backward (jax.ad_checkpoint):
# every projection's and expert GEMM's output and the attention kernels' outputs.
MATMUL_OUTPUT = "matmul"
EXPERT_MATMUL_OUTPUT = "expert_matmul"
ATTENTION_OUTPUT = "attention_out"  # the lightning kernel's o and softmax attention's o
SAVED_BY_SAVE_MATMULS = (MATMUL_OUTPUT, EXPERT_MATMUL_OUTPUT, ATTENTION_OUTPUT)


def matmul(equation: str, x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  """einsum in `dtype` (inputs cast), float32 accumulation; on a GPU the gradients' products too.
  The output is named MATMUL_OUTPUT for remat policies.

  equation: two operands, every index of each also in the other or the output (a matmul with
  batch axes), e.g. "bte,ehd->bthd".
  """
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if gradients_in_operand_dtype():
    out = _accumulating_einsum(equation, x, kernel)
  else:
    out = jnp.einsum(equation, x, kernel, preferred_element_type=jnp.float32).astype(dtype)
  return checkpoint_name(out, MATMUL_OUTPUT)


def gradients_in_operand_dtype() -> bool:
  """Whether matmul's gradients multiply in the operands' dtype (a GPU). Elsewhere autodiff's
  float32 products stay: XLA:CPU has no bfloat16 x bfloat16 -> float32 batched dot (DotThunk),
  and every CPU result keeps its bits."""
  return jax.default_backend() == "gpu"


# Differentiating einsum(..., preferred_element_type=float32).astype(bfloat16) transposes the
# products with a float32 cotangent, which promotes the bfloat16 operand: float32 GEMMs (TF32 on a
# GPU) on twice the bytes. The cotangent holds bfloat16 values, so the gradients below multiply in
# the operands' dtype with float32 accumulation: the same products, summed in another order.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _accumulating_einsum(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jnp.einsum(equation, x, kernel, preferred_element_type=jnp.float32).astype(x.dtype)


def _accumulating_einsum_fwd(equation, x, kernel):
  return _accumulating_einsum(equation, x, kernel), (x, kernel)


def _accumulating_einsum_bwd(equation, residuals, g):
  x, kernel = residuals
  x_equation, kernel_equation = transposed_equations(equation)
  g = g.astype(x.dtype)
  dx = jnp.einsum(x_equation, g, kernel, preferred_element_type=jnp.float32)
  dk = jnp.einsum(kernel_equation, x, g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def transposed_equations(equation: str) -> tuple[str, str]:
  """"bte,ehd->bthd" -> ("bthd,ehd->bte", "bte,bthd->ehd"): the products giving the gradients
  of the first and the second operand from the output's."""
  inputs, _, out = equation.replace(" ", "").partition("->")
  lhs, _, rhs = inputs.partition(",")
  if not (out and lhs and rhs) or "," in rhs:
    raise ValueError(f"matmul {equation!r}: expected 'lhs,rhs->out'")
  if set(lhs) - set(rhs + out) or set(rhs) - set(lhs + out):
    raise ValueError(f"matmul {equation!r}: an index of one operand appears in neither the other "
                     "nor the output (summed away alone, not a matmul)")
  return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


_accumulating_einsum.defvjp(_accumulating_einsum_fwd, _accumulating_einsum_bwd)
