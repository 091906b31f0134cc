"""Rotary position embedding, NeoX (half-split) style, on the first `rotary_dim` dims of a head."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
  """Rotates x[..., :rotary_dim] by position; the remaining dims pass through.

  x [B, T, N, D]; positions int [B, T]. Frequencies theta^(-2i/rotary_dim), i < rotary_dim / 2;
  pairs are (i, i + rotary_dim/2). Computed in float32, returned in x.dtype.
  """
  if rotary_dim == 0:
    return x
  half = rotary_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x.dtype)
