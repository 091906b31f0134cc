"""Kernels of m1jax, each beside its pure-jnp reference and one dispatch (JAX's Pallas ops
convention). Pallas on GPU: Mosaic GPU on Hopper, the Triton lowering elsewhere; `interpret=True`
runs the kernels on CPU.

  lightning/        lightning attention forward, backward (custom_vjp) and decode
  grouped_matmul/   the MoE's expert GEMMs (rows sorted by expert), forward and both gradients
"""

from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.lightning import DEFAULT_CONFIG
from pallas_kernels.lightning import KernelConfig
from pallas_kernels.lightning import lightning_attention
from pallas_kernels.lightning import lightning_attention_decode

__all__ = ["DEFAULT_CONFIG", "KernelConfig", "grouped_matmul", "lightning_attention",
           "lightning_attention_decode"]
