"""The one entry point of lightning attention: the Pallas kernels or a jnp reference, by name.

    o, state = lightning_attention(q, k, v, slope, initial_state, impl="pallas", config=...)
    o, state = lightning_attention_decode(q, k, v, slope, state, impl="pallas")
    o, states = lightning_attention_decode(q, k, v, slope, states, layer, impl="pallas")

impl: "pallas" (the kernels of `kernel.py`: Mosaic GPU on Hopper, Triton sweeps elsewhere; on CPU
only with interpret=True), "blockwise" / "recurrent" / "quadratic" (the jnp references of
`reference.py`), or "auto" ("pallas" on a GPU backend, "blockwise" elsewhere). The kernels tile
time by `config.block_size` (KernelConfig); the jnp blockwise path by `block_size`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.lightning import kernel
from pallas_kernels.lightning import reference
from pallas_kernels.lightning.kernel import DEFAULT_CONFIG, KernelConfig

IMPLEMENTATIONS = ("auto", "pallas", "blockwise", "recurrent", "quadratic")


def resolve_impl(impl: str) -> str:
  """"auto" -> "pallas" on a GPU backend, "blockwise" elsewhere; other names are checked."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"lightning attention implementation {impl!r}; choose one of "
                     f"{IMPLEMENTATIONS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "blockwise"
  return impl


def lightning_attention(q, k, v, slope, initial_state=None, *, impl: str = "pallas",
                        config: KernelConfig = DEFAULT_CONFIG, interpret: bool = False,
                        block_size: int = 256):
  """Lightning attention, differentiable in q, k, v and initial_state.

  Args:
    q, k, v: [B, T, H, D], one dtype (bfloat16, float16 or float32).
    slope: [H] float32; the decay per token is exp(-slope). Not differentiated.
    initial_state: [B, H, D, D] (float32 accumulation) or None for zeros.
    impl: see the module docstring.
    config: the kernels' tiling and forward choice ("pallas" only).
    interpret: run the kernels in the Pallas interpreter ("pallas" only; CPU tests).
    block_size: tokens per block of the jnp "blockwise" path.

  Returns:
    o [B, T, H, D] in q.dtype and the final state [B, H, D, D] in float32.
  """
  impl = resolve_impl(impl)
  if impl == "pallas":
    return kernel.lightning_attention_pallas(q, k, v, slope, initial_state, interpret=interpret,
                                             config=config)
  if impl == "recurrent":
    return reference.lightning_attention_recurrent(q, k, v, slope, initial_state)
  if impl == "quadratic":
    return reference.lightning_attention_quadratic(q, k, v, slope, initial_state)
  return reference.lightning_attention_blockwise(q, k, v, slope, initial_state,
                                                 block_size=block_size)


def lightning_attention_decode(q, k, v, slope, state, layer=None, *, impl: str = "pallas",
                               interpret: bool = False, value_tile: int = 64, num_warps: int = 4):
  """One token per sequence. q, k, v [B, H, D]; slope [H].

  state: [B, H, D, D] float32, or with `layer` (int32 []) stacked states [L, B, H, D, D] of which
  row `layer` is this layer's. Returns (o [B, H, D] in q.dtype, the new state in the same form:
  with `layer`, the stack with that row replaced).

  "pallas" runs the decode kernel, which updates the stack in place (one read and one write of
  the row; without `layer`, donate `state` to reuse its buffer); the jnp impls run the one-token
  step of the recurrence and write the row back with dynamic_update_slice. "auto" is "pallas" on
  a GPU (inside the model's decode step the kernel is 12% faster at B = 256: docs/benchmarks.md)
  unless the stack has more elements than the kernel addresses (MAX_DECODE_STATE_ELEMENTS).
  """
  stacked = state if layer is not None else state[None]
  row = 0 if layer is None else layer
  fits_kernel = stacked.size <= kernel.MAX_DECODE_STATE_ELEMENTS
  impl = resolve_impl(impl) if impl != "auto" or fits_kernel else "blockwise"
  if impl == "pallas":
    o, stacked = kernel.lightning_attention_decode_pallas(
        q, k, v, slope, stacked, jnp.asarray(row, jnp.int32), interpret=interpret,
        value_tile=value_tile, num_warps=num_warps)
  else:
    o, new = reference.lightning_decode_step(q, k, v, slope, stacked[row])
    stacked = jax.lax.dynamic_update_index_in_dim(stacked, new, row, axis=0)
  return o, (stacked if layer is not None else stacked[0])
