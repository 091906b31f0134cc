"""HF safetensors checkpoints <-> m1jax params, one tensor at a time.

Every HF tensor is described by the blocks of params it fills (`_Slot` / `_Piece`: a reshape, a
pick and a transpose). `load_params` preallocates every parameter on the host in its final
layout and fills it as tensors are read (host memory: the converted params plus one tensor);
`load_sharded` fills only the device blocks this process holds, from safetensors slices, one
block at a time (host memory: about one block; `load_plan` gives the numbers). The on-disk
per-expert names (`block_sparse_moe.experts.{e}.w1/w2/w3`) and transformers 5.x fused expert
names (`mlp.experts.gate_up_proj` / `down_proj`) are both accepted; the lightning decay buffers
(`slope_rate`, `query_decay`, `key_decay`, `diagonal_decay`) are recomputed, so they are skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Iterator, NamedTuple

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from m1jax import sharding
from m1jax.config import ModelConfig

_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
# safetensors dtypes a weight may be stored in; integer, boolean and fp8 tensors are rejected.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class _Piece(NamedTuple):
  """How an HF tensor fills one block of a params leaf: leaf[index] is the tensor with each HF
  axis a split into the sizes split[a] (a reshape), positions `take` (view axis -> index) picked,
  and the remaining view axes in the order `axes` (a transpose)."""
  path: tuple[str, ...]  # the params leaf
  index: tuple[int, ...]  # leading positions in the leaf: (layer group,) or (group, expert)
  split: tuple[tuple[int, ...], ...]  # per HF axis: its sizes in the view
  axes: tuple[int, ...]  # view axes in leaf order
  take: tuple[tuple[int, int], ...] = ()  # (view axis, position): fused gate/up halves

  def _view_ranges(self, box) -> list[tuple[int, int]]:
    """(start, stop) per view axis for leaf[index][box]."""
    ranges = [(0, n) for sizes in self.split for n in sizes]
    for axis, position in self.take:
      ranges[axis] = (position, position + 1)
    if box is not None:
      for leaf_axis, view_axis in enumerate(self.axes):
        ranges[view_axis] = tuple(box[leaf_axis])
    return ranges

  def _outer_axes(self) -> list[int]:
    """The first view axis of each HF axis."""
    return np.cumsum([0] + [len(sizes) for sizes in self.split[:-1]]).tolist()

  def hf_box(self, box=None) -> tuple[slice, ...]:
    """The HF slice to read for leaf[index][box] (box: (start, stop) per leaf axis after index;
    None: all). An HF axis split into several view axes is read over whole inner blocks."""
    ranges, out = self._view_ranges(box), []
    for v, sizes in zip(self._outer_axes(), self.split):
      inner = int(np.prod(sizes[1:], dtype=np.int64))
      out.append(slice(ranges[v][0] * inner, ranges[v][1] * inner))
    return tuple(out)

  def value(self, tensor, box=None) -> np.ndarray:
    """leaf[index][box] from `tensor`: a numpy array, or a safetensors slice of which only
    hf_box(box) is read."""
    ranges, outer, taken = self._view_ranges(box), set(self._outer_axes()), dict(self.take)
    view = [n for sizes in self.split for n in sizes]
    part = np.asarray(tensor[self.hf_box(box)])
    part = part.reshape([stop - start if v in outer else n
                         for v, (n, (start, stop)) in enumerate(zip(view, ranges))])
    part = part[tuple((0 if v in outer else taken[v]) if v in taken
                      else slice(None) if v in outer else slice(*ranges[v])
                      for v in range(len(view)))]
    kept = [v for v in range(len(view)) if v not in taken]
    return np.transpose(part, [kept.index(v) for v in self.axes])


class _Slot(NamedTuple):
  """An HF tensor's expected shape and the params blocks it fills."""
  hf_shape: tuple[int, ...]
  pieces: tuple[_Piece, ...]

  def place(self, params, src: np.ndarray) -> None:
    """Writes the whole tensor `src` into a params tree of numpy arrays."""
    for piece in self.pieces:
      _get_path(params, piece.path)[piece.index] = piece.value(src)


def _slot(path, index, split, axes, take=()) -> _Slot:
  """The slot of an HF tensor of shape prod(split[a]) per axis filling one params block."""
  piece = _Piece(tuple(path), tuple(index), tuple(map(tuple, split)), tuple(axes), tuple(take))
  return _Slot(tuple(int(np.prod(sizes)) for sizes in piece.split), (piece,))


def _get_path(tree: dict, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def _layer_location(cfg: ModelConfig, i: int) -> tuple[str, str, int]:
  """Where layer i's params are stacked: ("layers", "layer_{i % p}") and row i // p."""
  group, j = divmod(i, cfg.layer_period)
  return "layers", f"layer_{j}", group


def _layer_slots(cfg: ModelConfig, i: int, fused_experts: bool) -> dict[str, _Slot]:
  """HF key -> slot for layer i. Torch Linear weights are [out, in]; ours are [in, ...out]."""
  e, hd, nh, kvh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
  inter, nx = cfg.intermediate_size, cfg.num_local_experts
  *ours, group = _layer_location(cfg, i)
  p = f"model.layers.{i}"

  def at(*path, split, axes, take=(), index=()):
    return _slot((*ours, *path), (group, *index), split, axes, take)

  def in_first(path, heads, head_dim):  # [H*D, E] -> [E, H, D]
    return at(*path, split=((heads, head_dim), (e,)), axes=(2, 0, 1))

  def out_first(path, heads, head_dim):  # [E, H*D] -> [H, D, E]
    return at(*path, split=((e,), (heads, head_dim)), axes=(1, 2, 0))

  norm = lambda *path: at(*path, split=((e,),), axes=(0,))
  slots = {
      f"{p}.input_layernorm.weight": norm("input_norm", "scale"),
      f"{p}.post_attention_layernorm.weight": norm("post_attn_norm", "scale"),
  }
  a = f"{p}.self_attn"
  if cfg.is_lightning[i]:
    slots.update({
        f"{a}.qkv_proj.weight": in_first(("attn", "qkv"), nh, 3 * hd),
        f"{a}.output_gate.weight": in_first(("attn", "gate"), nh, hd),
        f"{a}.out_proj.weight": out_first(("attn", "out"), nh, hd),
        f"{a}.norm.weight": at("attn", "norm", "scale", split=((nh, hd),), axes=(0, 1)),
    })
  else:
    slots.update({
        f"{a}.q_proj.weight": in_first(("attn", "q"), nh, hd),
        f"{a}.k_proj.weight": in_first(("attn", "k"), kvh, hd),
        f"{a}.v_proj.weight": in_first(("attn", "v"), kvh, hd),
        f"{a}.o_proj.weight": out_first(("attn", "o"), nh, hd),
    })
  moe = f"{p}.block_sparse_moe"
  slots[f"{moe}.gate.weight"] = at("moe", "router", split=((nx,), (e,)), axes=(1, 0))
  if fused_experts:  # gate_up [X, 2I, E] with the gate rows first; down [X, E, I]
    halves = tuple(at("moe", name, split=((nx,), (2, inter), (e,)), axes=(0, 3, 2),
                      take=((1, half),)).pieces[0] for half, name in enumerate(("w1", "w3")))
    slots[f"{p}.mlp.experts.gate_up_proj"] = _Slot((nx, 2 * inter, e), halves)
    slots[f"{p}.mlp.experts.down_proj"] = at("moe", "w2", split=((nx,), (e,), (inter,)),
                                             axes=(0, 2, 1))
  else:
    for x in range(nx):
      for name, out_dim, in_dim in (("w1", inter, e), ("w3", inter, e), ("w2", e, inter)):
        slots[f"{moe}.experts.{x}.{name}.weight"] = at(
            "moe", name, split=((out_dim,), (in_dim,)), axes=(1, 0), index=(x,))
  return slots


def _model_slots(cfg: ModelConfig, fused_experts: bool) -> dict[str, _Slot]:
  v, e = cfg.vocab_size, cfg.hidden_size
  slots = {
      "model.embed_tokens.weight": _slot(("embed",), (), ((v,), (e,)), (0, 1)),
      "lm_head.weight": _slot(("lm_head",), (), ((v,), (e,)), (1, 0)),
      "model.norm.weight": _slot(("final_norm", "scale"), (), ((e,),), (0,)),
  }
  for i in range(cfg.num_hidden_layers):
    slots.update(_layer_slots(cfg, i, fused_experts))
  return slots


def _normalise_key(key: str) -> str:
  """Accepts transformers' in-memory MoE prefix `mlp.gate` for the router."""
  return re.sub(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$", r"\1.block_sparse_moe.gate.weight",
                key)


def _is_decay_buffer(key: str) -> bool:
  return key.rsplit(".", 1)[-1] in _DECAY_BUFFERS


def _shard_files(ckpt_dir: str) -> list[str]:
  index = os.path.join(ckpt_dir, "model.safetensors.index.json")
  single = os.path.join(ckpt_dir, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index}: not a safetensors index (a JSON object with a \"weight_map\" "
                       f"of key -> file): {e!r}") from None
    files = [os.path.join(ckpt_dir, name) for name in names]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise FileNotFoundError(f"{index} names {absent[0]}, which does not exist")
    return files
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"{ckpt_dir}: neither model.safetensors nor model.safetensors.index.json")


@contextlib.contextmanager
def _open(path: str):
  """safe_open(path) whose errors (empty, truncated, not safetensors) name the file."""
  try:
    with safe_open(path, framework="np") as f:
      yield _File(path, f)
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


class _File:
  """A safetensors file whose reads name the file and tensor when they fail."""

  def __init__(self, path: str, handle):
    self.path, self._f = path, handle

  def keys(self):
    return self._f.keys()

  def get_slice(self, key):
    return self._f.get_slice(key)

  def get_tensor(self, key) -> np.ndarray:
    try:
      return self._f.get_tensor(key)
    except SafetensorError as e:
      raise ValueError(f"{self.path}: cannot read tensor {key} ({e})") from None


class _Info(NamedTuple):
  """A checkpoint tensor: where it is stored, its shape and safetensors dtype."""
  file: str
  key: str  # as stored (before _normalise_key)
  shape: tuple[int, ...]
  dtype: str


def _tensor_infos(files: list[str]) -> dict[str, _Info]:
  infos = {}
  for path in files:
    with _open(path) as f:
      for key in f.keys():
        tensor = f.get_slice(key)
        infos[_normalise_key(key)] = _Info(path, key, tuple(tensor.get_shape()),
                                           tensor.get_dtype())
  return infos


def _check_dtypes(infos: dict[str, _Info]) -> None:
  for key, info in infos.items():
    if info.dtype not in _FLOAT_DTYPES and not _is_decay_buffer(key):
      raise ValueError(f"{info.file}: tensor {info.key} is {info.dtype}; weights must be one of "
                       f"{_FLOAT_DTYPES}")


def _check_finite(value: np.ndarray, file: str, key: str) -> None:
  if not np.isfinite(value).all():
    bad = np.asarray(value).reshape(-1)[~np.isfinite(np.asarray(value).reshape(-1))][0]
    raise ValueError(f"{file}: tensor {key} holds non-finite values ({bad} among them); "
                     "pass check_finite=False to load it anyway")


def _check_keys(slots, shapes, ckpt_dir):
  def listing(keys):
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"
  unexpected = sorted(k for k in shapes if k not in slots and not _is_decay_buffer(k))
  if unexpected:
    raise ValueError(f"{ckpt_dir}: unexpected checkpoint key(s) {listing(unexpected)} "
                     "for this config")
  missing = sorted(k for k in slots if k not in shapes)
  if missing:
    raise ValueError(f"{ckpt_dir}: missing checkpoint key(s) {listing(missing)}; "
                     f"{missing[0]} should have shape {slots[missing[0]].hf_shape}")
  for key, slot in slots.items():
    if shapes[key] != slot.hf_shape:
      raise ValueError(f"{ckpt_dir}: {key} has shape {shapes[key]}; this config expects "
                       f"{slot.hf_shape}")


def load_params(cfg: ModelConfig, ckpt_dir: str, *, check_finite: bool = True
                ) -> dict[str, Any]:
  """Reads the safetensors of `ckpt_dir` into a params pytree (numpy, cfg.param_dtype).
  Non-float tensors are rejected; `check_finite`: so is a tensor holding NaN or inf (named)."""
  from m1jax import model  # pylint: disable=g-import-not-at-top
  files = _shard_files(ckpt_dir)
  infos = _tensor_infos(files)
  shapes = {key: info.shape for key, info in infos.items()}
  slots = _model_slots(
      cfg, fused_experts=any(k.endswith(".mlp.experts.gate_up_proj") for k in shapes))
  _check_keys(slots, shapes, ckpt_dir)
  _check_dtypes(infos)
  dtype = _NP_DTYPES[cfg.param_dtype]
  abstract = model.abstract_params(cfg)
  params = jax.tree.map(lambda x: np.empty(x.shape, dtype), abstract)
  for path in files:
    with _open(path) as f:
      for key in f.keys():
        name = _normalise_key(key)
        if not _is_decay_buffer(name):
          value = f.get_tensor(key)
          if check_finite:
            _check_finite(value, path, key)
          slots[name].place(params, value.astype(dtype))
  return params


# --- Streaming into shards ------------------------------------------------------------------------


def _leaf_pieces(slots: dict[str, _Slot]) -> dict[tuple[str, ...], list[tuple[str, _Piece]]]:
  """params leaf path -> the (HF key, piece) pairs that fill it."""
  pieces: dict[tuple[str, ...], list[tuple[str, _Piece]]] = {}
  for key, slot in slots.items():
    for piece in slot.pieces:
      pieces.setdefault(piece.path, []).append((key, piece))
  return pieces


def _pieces_in(box, pieces):
  """(HF key, piece, position in the block, box of the piece's part) for pieces inside `box`."""
  for key, piece in pieces:
    lead, rest = box[:len(piece.index)], box[len(piece.index):]
    if all(start <= i < stop for i, (start, stop) in zip(piece.index, lead)):
      yield key, piece, tuple(i - start for i, (start, _) in zip(piece.index, lead)), rest


def load_sharded(cfg: ModelConfig, ckpt_dir: str, shardings, *, check_finite: bool = True
                 ) -> dict[str, Any]:
  """Reads the safetensors of `ckpt_dir` straight into `shardings` (a params pytree of jax
  Shardings) -> params of global jax.Arrays in cfg.param_dtype.

  Leaf by leaf, each block that this process's devices hold is filled from slices of the HF
  tensors it covers (safetensors `get_slice`: only those rows and columns are read), copied to
  its devices and freed; replicated copies are read once. In a multi-process run each process
  reads only its own devices' blocks. Peak host memory: one block plus one slice (see
  `load_plan`); nothing is compiled. Checks as `load_params` (on the slices read).
  """
  from m1jax import model  # pylint: disable=g-import-not-at-top
  locations = _tensor_infos(_shard_files(ckpt_dir))
  shapes = {key: location.shape for key, location in locations.items()}
  slots = _model_slots(
      cfg, fused_experts=any(k.endswith(".mlp.experts.gate_up_proj") for k in shapes))
  _check_keys(slots, shapes, ckpt_dir)
  _check_dtypes(locations)
  pieces = _leaf_pieces(slots)
  dtype = _NP_DTYPES[cfg.param_dtype]
  with contextlib.ExitStack() as files:
    handles = {}

    def tensor(key):
      location = locations[key]
      if location.file not in handles:
        handles[location.file] = files.enter_context(_open(location.file))
      return handles[location.file].get_slice(location.key)

    def blocks(path, leaf_shape, leaf_sharding):
      for box in sharding.local_blocks(leaf_sharding, leaf_shape):
        block = np.empty(sharding.box_shape(box), dtype)
        for key, piece, at, rest in _pieces_in(box, pieces[path]):
          location = locations[key]
          try:
            value = piece.value(tensor(key), rest)
          except SafetensorError as e:
            raise ValueError(f"{location.file}: cannot read tensor {location.key} ({e})"
                             ) from None
          if check_finite:
            _check_finite(value, location.file, location.key)
          block[at] = value
        yield box, block
        del block  # before the next block is allocated

    def build(path, leaf, leaf_sharding):
      path = tuple(k.key for k in path)
      return sharding.array_from_blocks(leaf.shape, dtype, leaf_sharding,
                                        blocks(path, leaf.shape, leaf_sharding))

    return jax.tree_util.tree_map_with_path(build, model.abstract_params(cfg), shardings)


class LoadPlan(NamedTuple):
  """What `load_sharded` does with given shardings, from shapes alone (nothing is read)."""
  devices: int
  blocks: int  # distinct blocks, summed over the leaves (replicated copies counted once)
  bytes_per_device: int  # params bytes each device holds (cfg.param_dtype)
  peak_host_bytes: int  # one process: the largest block plus the largest slice read into it
  largest_tensor_bytes: int  # the largest checkpoint tensor (checkpoint dtype)
  total_bytes: int  # all params (cfg.param_dtype)

  def describe(self) -> str:
    return (f"{self.devices} devices, {self.blocks} blocks; per device "
            f"{_bytes(self.bytes_per_device)} of {_bytes(self.total_bytes)}; peak host memory per "
            f"process {_bytes(self.peak_host_bytes)} (largest checkpoint tensor "
            f"{_bytes(self.largest_tensor_bytes)})")


def _bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def load_plan(cfg: ModelConfig, shardings, *, checkpoint_dtype: str = "bfloat16",
              fused_experts: bool = False) -> LoadPlan:
  """The plan of `load_sharded(cfg, <a checkpoint in checkpoint_dtype>, shardings)`: blocks,
  bytes per device and peak host bytes. `shardings` may be over a jax.sharding.AbstractMesh
  (a dry run for a machine one does not have: nothing is allocated or read)."""
  from m1jax import model  # pylint: disable=g-import-not-at-top
  slots = _model_slots(cfg, fused_experts)
  pieces = _leaf_pieces(slots)
  itemsize = np.dtype(_NP_DTYPES[cfg.param_dtype]).itemsize
  read_itemsize = np.dtype(_NP_DTYPES[checkpoint_dtype]).itemsize
  abstract = model.abstract_params(cfg)
  devices = blocks = per_device = peak = total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    leaf_sharding = _get_path(shardings, tuple(k.key for k in path))
    block_shape = leaf_sharding.shard_shape(leaf.shape)
    box = tuple((0, n) for n in block_shape)  # every block has this shape: one stands for all
    block_bytes = int(np.prod(block_shape)) * itemsize
    reads = [int(np.prod([len(range(*s.indices(n))) for s, n in
                          zip(piece.hf_box(rest), slots[key].hf_shape)])) * read_itemsize
             for key, piece, _, rest in _pieces_in(box, pieces[tuple(k.key for k in path)])]
    devices = max(devices, leaf_sharding.num_devices)
    blocks += int(np.prod([n // b for n, b in zip(leaf.shape, block_shape)]))
    per_device += block_bytes
    peak = max(peak, block_bytes + max(reads, default=0))
    total += int(np.prod(leaf.shape)) * itemsize
  largest = max(int(np.prod(slot.hf_shape)) for slot in slots.values()) * read_itemsize
  return LoadPlan(devices, blocks, per_device, peak, largest, total)


def export_tensors(cfg: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, tensor [out, in]) pairs in on-disk naming (per-expert w1/w2/w3), one at a time."""
  e, hd, nh, kvh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
  get = lambda *path: np.asarray(_get_path(params, path))
  yield "model.embed_tokens.weight", get("embed")
  yield "model.norm.weight", get("final_norm", "scale")
  yield "lm_head.weight", get("lm_head").T
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}"
    *ours, group = _layer_location(cfg, i)
    at = lambda *path: np.asarray(_get_path(params, (*ours, *path))[group])  # one layer's row
    yield f"{p}.input_layernorm.weight", at("input_norm", "scale")
    yield f"{p}.post_attention_layernorm.weight", at("post_attn_norm", "scale")
    a = f"{p}.self_attn"
    if cfg.is_lightning[i]:
      yield f"{a}.qkv_proj.weight", at("attn", "qkv").reshape(e, 3 * nh * hd).T
      yield f"{a}.output_gate.weight", at("attn", "gate").reshape(e, nh * hd).T
      yield f"{a}.out_proj.weight", at("attn", "out").reshape(nh * hd, e).T
      yield f"{a}.norm.weight", at("attn", "norm", "scale").reshape(nh * hd)
    else:
      yield f"{a}.q_proj.weight", at("attn", "q").reshape(e, nh * hd).T
      yield f"{a}.k_proj.weight", at("attn", "k").reshape(e, kvh * hd).T
      yield f"{a}.v_proj.weight", at("attn", "v").reshape(e, kvh * hd).T
      yield f"{a}.o_proj.weight", at("attn", "o").reshape(nh * hd, e).T
    moe = f"{p}.block_sparse_moe"
    yield f"{moe}.gate.weight", at("moe", "router").T
    for name in ("w1", "w3", "w2"):
      weights = at("moe", name)
      for x in range(cfg.num_local_experts):
        yield f"{moe}.experts.{x}.{name}.weight", weights[x].T


def save_checkpoint(cfg: ModelConfig, params, out_dir: str, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 << 30) -> None:
  """config.json + model.safetensors (or shards + index) loadable by transformers."""
  os.makedirs(out_dir, exist_ok=True)
  dtype = dtype or cfg.param_dtype
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype {dtype!r}; choose one of {sorted(_NP_DTYPES)}")
  hf_config = cfg.to_hf()
  hf_config["dtype"] = dtype
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)

  names, weight_map, total = [], {}, 0
  current, current_bytes = {}, 0

  def flush():
    names.append(f"shard-{len(names):05d}.safetensors")
    save_file(current, os.path.join(out_dir, names[-1]), metadata={"format": "pt"})
    weight_map.update({k: names[-1] for k in current})

  for key, tensor in export_tensors(cfg, params):
    tensor = np.ascontiguousarray(tensor.astype(_NP_DTYPES[dtype]))
    if current and current_bytes + tensor.nbytes > max_shard_bytes:
      flush()
      current, current_bytes = {}, 0
    current[key] = tensor
    current_bytes += tensor.nbytes
    total += tensor.nbytes
  flush()
  if len(names) == 1:
    os.replace(os.path.join(out_dir, names[0]), os.path.join(out_dir, "model.safetensors"))
    return
  final = {name: f"model-{n + 1:05d}-of-{len(names):05d}.safetensors"
           for n, name in enumerate(names)}
  for old, new in final.items():
    os.replace(os.path.join(out_dir, old), os.path.join(out_dir, new))
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total},
               "weight_map": {k: final[v] for k, v in weight_map.items()}}, f, indent=2)
