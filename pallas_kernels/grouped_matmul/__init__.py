"""Grouped matmul for the MoE's experts: XLA references (reference.py), JAX's Mosaic GPU kernels
with m1jax's tiling (mosaic.py) and the one dispatch with its custom_vjp (ops.py)."""

from pallas_kernels.grouped_matmul.ops import IMPLEMENTATIONS
from pallas_kernels.grouped_matmul.ops import grouped_matmul

__all__ = ["IMPLEMENTATIONS", "grouped_matmul"]
