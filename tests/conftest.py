"""Test set-up: 8 fake CPU devices (for sharding tests) and the `gpu` marker."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
