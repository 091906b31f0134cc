"""Test set-up: 8 fake CPU devices (for sharding tests), quick XLA:CPU compiles, the gpu marker."""

import glob
import os

# Must happen before jax initialises its backends; the subprocesses tests start inherit it.
# Without a GPU, compiling XLA:CPU programs is most of the suite's time and running them little
# (tiny models): the legacy emitters with LLVM -O0 compile them 2-3x faster (no fast-math either
# way). Not on GPU machines, where the optimization level would apply to the GPU kernels too.
_CPU_COMPILE_FLAGS = ("" if glob.glob("/dev/nvidia[0-9]*") else
                      " --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + _CPU_COMPILE_FLAGS)

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same tiny programs; a persistent cache shared by the pytest-xdist workers
# (and the subprocesses tests start) compiles each once per session.
_CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def blocks_copied_to_devices(monkeypatch):
  """Host-memory tests: on CPU, device_put may keep an aligned numpy block as the device buffer
  (zero copy), which tracemalloc would count as host memory; a device-side copy frees the block,
  as a transfer to a GPU would."""
  from m1jax import sharding  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sharding, "_put", lambda value, device: jax.device_put(
      jax.device_put(value, device), device, may_alias=False))


def pytest_collection_modifyitems(config, items):
  del config
  if any(d.platform == "gpu" for d in jax.devices()):
    return
  skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip_gpu)
