"""Host <-> device data movement for any number of processes.

Every process holds the same host-side batch (data pipelines are deterministic from the seed);
`to_global` makes the global device array, batch dim sharded over the mesh, and `to_host` brings
a global array back in full on every process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from m1jax import sharding


def to_global(array: np.ndarray, mesh) -> jax.Array:
  """A host array (identical on every process) as a global device array, batch dim sharded."""
  array = np.asarray(array)
  target = sharding.batch_sharding(mesh, array.ndim)
  return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) global array on every process."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def sync_processes(name: str):
  """A barrier across the run's processes (nothing with one process); `name` must be unique."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
