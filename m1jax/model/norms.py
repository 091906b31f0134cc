"""RMSNorm as MiniMax and transformers compute it: normalise in fp32, cast back, scale."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float, axes: Sequence[int] = (-1,)) -> jax.Array:
  """x / rms(x) over `axes`, computed in float32, returned in x.dtype."""
  xf = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(xf), axis=tuple(axes), keepdims=True)
  return (xf * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the trailing `len(logical_axes)` dims; weight shaped like those dims."""

  eps: float
  logical_axes: tuple[str, ...] = ("norm",)
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.logical_axes)
    scale = self.param("scale",
                       nn.with_logical_partitioning(nn.initializers.ones, self.logical_axes),
                       x.shape[-n:], self.param_dtype)
    return rms_normalize(x, self.eps, axes=tuple(range(-n, 0))) * scale.astype(x.dtype)
