"""Shared pieces of the model's modules: partitioned parameters and sharding constraints."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def matmul(equation: str, x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  """einsum in `dtype` (inputs cast), float32 accumulation."""
  return jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)
