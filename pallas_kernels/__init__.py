"""Pallas GPU kernels for m1jax: Triton lowering (`interpret=True` runs them on CPU) and a Mosaic
GPU forward for Hopper (pallas_kernels.lightning_mosaic), picked by lightning_attention."""

from pallas_kernels.lightning_attention import DEFAULT_CONFIG
from pallas_kernels.lightning_attention import KernelConfig
from pallas_kernels.lightning_attention import lightning_attention
from pallas_kernels.lightning_attention import lightning_attention_decode

__all__ = ["DEFAULT_CONFIG", "KernelConfig", "lightning_attention", "lightning_attention_decode"]
