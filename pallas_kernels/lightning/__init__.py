"""Lightning attention: pure-jnp references (reference.py), the Pallas kernels (kernel.py: Triton
sweeps, the Mosaic GPU sweeps of mosaic.py on Hopper) and the one dispatch (ops.py)."""

from pallas_kernels.lightning.kernel import DEFAULT_CONFIG
from pallas_kernels.lightning.kernel import SWEEP_IMPLS
from pallas_kernels.lightning.kernel import KernelConfig
from pallas_kernels.lightning.kernel import is_hopper
from pallas_kernels.lightning.ops import IMPLEMENTATIONS
from pallas_kernels.lightning.ops import lightning_attention
from pallas_kernels.lightning.ops import lightning_attention_decode
from pallas_kernels.lightning.ops import resolve_impl

__all__ = ["DEFAULT_CONFIG", "SWEEP_IMPLS", "KernelConfig", "is_hopper", "IMPLEMENTATIONS",
           "lightning_attention", "lightning_attention_decode", "resolve_impl"]
