"""What the kernels ask of the device they run on."""

from __future__ import annotations

import jax


def is_hopper() -> bool:
  """Whether the default device is a GPU of compute capability 9.x (H100, H200): the Mosaic GPU
  kernels' target (TMA, wgmma)."""
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
