"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded),
`tensor` (heads / MLP width / vocab), `expert` (experts). Every parameter and the main activations
carry logical names (m1jax/model); `LOGICAL_RULES` below is the only place they meet the mesh.
The same code runs on 1 device, on fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), on one GPU and on many hosts.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# (logical name, mesh axis or axes or None). Parameters first, then activations.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", None),  # the scanned layer-group axis of stacked layer params
    ("head_dim", None),
    ("qkv_dim", None),
    ("norm", None),
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A Mesh over MESH_AXES. `shape` maps axis -> size; one size may be -1 (the rest of the devices).

  Missing axes have size 1. Default: every device on `fsdp`.
  """
  devices = jax.devices() if devices is None else devices
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {free}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {shape}")
    sizes[free[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; have {len(devices)}")
  grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Mesh + logical axis rules in scope: activation constraints in the model take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def _fit(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*fitted)


def param_shardings(logical_specs, abstract_params, mesh: Mesh):
  """NamedShardings for params from their logical specs, replicating non-divisible dims."""
  def convert(spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(spec, LOGICAL_RULES)
    return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh))
  return jax.tree.map(convert, logical_specs, abstract_params,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim over data, fsdp and expert; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"), *([None] * (ndim - 1))))


# A block of an array: (start, stop) per dimension.
Box = tuple[tuple[int, int], ...]


def local_blocks(sharding: jax.sharding.Sharding, shape) -> dict[Box, list[Any]]:
  """The distinct blocks of an array of `shape` that this process's devices hold under
  `sharding`, each with the local devices holding it (replicated copies share one block)."""
  blocks: dict[Box, list[Any]] = {}
  for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
    box = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    blocks.setdefault(box, []).append(device)
  return blocks


def box_shape(box: Box) -> tuple[int, ...]:
  return tuple(stop - start for start, stop in box)


def _put(value: np.ndarray, device) -> jax.Array:
  # On CPU the "device" buffer may alias a 64-byte aligned host array (zero copy): the block
  # then lives on as device memory; elsewhere it is copied.
  return jax.device_put(value, device)


def array_from_blocks(shape, dtype, sharding: jax.sharding.Sharding, blocks) -> jax.Array:
  """A global jax.Array from host blocks: `blocks` yields (box, numpy array) for every box of
  local_blocks(sharding, shape); each block is copied to its devices as it arrives, so the host
  holds one block at a time when `blocks` is a generator. Nothing is compiled."""
  devices = local_blocks(sharding, shape)
  arrays = []
  for box, value in blocks:
    if value.shape != box_shape(box) or value.dtype != dtype:
      raise ValueError(f"block {box}: got {value.shape} {value.dtype}, expected "
                       f"{box_shape(box)} {np.dtype(dtype)}")
    placed = [_put(value, device) for device in devices.pop(box)]
    jax.block_until_ready(placed)  # the block is dropped once its copies are made
    arrays.extend(placed)
    del value
  if devices:
    raise ValueError(f"blocks {sorted(devices)} of the sharding were not given")
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays, dtype=dtype)
