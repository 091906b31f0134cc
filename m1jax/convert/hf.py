"""HF safetensors checkpoints <-> m1jax params, one tensor at a time.

Reading keeps at most the converted params plus one checkpoint tensor in host memory: every
parameter is preallocated in its final layout and filled as tensors stream in. The on-disk
per-expert names (`block_sparse_moe.experts.{e}.w1/w2/w3`) and transformers 5.x fused expert
names (`mlp.experts.gate_up_proj` / `down_proj`) are both accepted; the lightning decay buffers
(`slope_rate`, `query_decay`, `key_decay`, `diagonal_decay`) are recomputed, so they are skipped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterator, NamedTuple

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from m1jax.config import ModelConfig

_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class _Slot(NamedTuple):
  """An HF tensor's expected shape and how it is written into the params tree."""
  hf_shape: tuple[int, ...]
  place: Callable[[dict, np.ndarray], None]


def _to(path: tuple[str, ...], transform: Callable[[np.ndarray], np.ndarray] = lambda x: x,
        index: tuple[int, ...] = ()):
  """A placer writing transform(src) into the leaf at `path`, at `index` (its leading dims)."""
  def place(params, src):
    _get_path(params, path)[index] = transform(src)
  return place


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
  in_first = lambda *shape: (lambda w: w.T.reshape(shape))  # [out, in] -> [in, *out_dims]

  def at(*path, transform=lambda x: x):
    return _to((*ours, *path), transform, (group,))

  slots = {
      f"{p}.input_layernorm.weight": _Slot((e,), at("input_norm", "scale")),
      f"{p}.post_attention_layernorm.weight": _Slot((e,), at("post_attn_norm", "scale")),
  }
  a = f"{p}.self_attn"
  if cfg.is_lightning[i]:
    slots.update({
        f"{a}.qkv_proj.weight": _Slot((3 * nh * hd, e),
                                      at("attn", "qkv", transform=in_first(e, nh, 3 * hd))),
        f"{a}.output_gate.weight": _Slot((nh * hd, e),
                                         at("attn", "gate", transform=in_first(e, nh, hd))),
        f"{a}.out_proj.weight": _Slot((e, nh * hd),
                                      at("attn", "out", transform=in_first(nh, hd, e))),
        f"{a}.norm.weight": _Slot((nh * hd,), at("attn", "norm", "scale",
                                                 transform=lambda w: w.reshape(nh, hd))),
    })
  else:
    slots.update({
        f"{a}.q_proj.weight": _Slot((nh * hd, e), at("attn", "q", transform=in_first(e, nh, hd))),
        f"{a}.k_proj.weight": _Slot((kvh * hd, e),
                                    at("attn", "k", transform=in_first(e, kvh, hd))),
        f"{a}.v_proj.weight": _Slot((kvh * hd, e),
                                    at("attn", "v", transform=in_first(e, kvh, hd))),
        f"{a}.o_proj.weight": _Slot((e, nh * hd), at("attn", "o", transform=in_first(nh, hd, e))),
    })
  moe = f"{p}.block_sparse_moe"
  slots[f"{moe}.gate.weight"] = _Slot((nx, e), at("moe", "router", transform=lambda w: w.T))
  if fused_experts:
    def gate_up(params, src):  # [X, 2I, E], gate rows first
      _get_path(params, (*ours, "moe", "w1"))[group] = np.swapaxes(src[:, :inter], 1, 2)
      _get_path(params, (*ours, "moe", "w3"))[group] = np.swapaxes(src[:, inter:], 1, 2)
    slots[f"{p}.mlp.experts.gate_up_proj"] = _Slot((nx, 2 * inter, e), gate_up)
    slots[f"{p}.mlp.experts.down_proj"] = _Slot(
        (nx, e, inter), at("moe", "w2", transform=lambda w: np.swapaxes(w, 1, 2)))
  else:
    for x in range(nx):
      for name, shape in (("w1", (inter, e)), ("w3", (inter, e)), ("w2", (e, inter))):
        slots[f"{moe}.experts.{x}.{name}.weight"] = _Slot(
            shape, _to((*ours, "moe", name), np.transpose, (group, x)))
  return slots


def _model_slots(cfg: ModelConfig, fused_experts: bool) -> dict[str, _Slot]:
  slots = {
      "model.embed_tokens.weight": _Slot((cfg.vocab_size, cfg.hidden_size), _to(("embed",))),
      "lm_head.weight": _Slot((cfg.vocab_size, cfg.hidden_size), _to(("lm_head",), np.transpose)),
      "model.norm.weight": _Slot((cfg.hidden_size,), _to(("final_norm", "scale"))),
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
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return [os.path.join(ckpt_dir, name) for name in sorted(set(weight_map.values()))]
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"{ckpt_dir}: neither model.safetensors nor model.safetensors.index.json")


def _checkpoint_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for path in files:
    with safe_open(path, framework="np") as f:
      for key in f.keys():
        shapes[_normalise_key(key)] = tuple(f.get_slice(key).get_shape())
  return shapes


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


def load_params(cfg: ModelConfig, ckpt_dir: str) -> dict[str, Any]:
  """Reads the safetensors of `ckpt_dir` into a params pytree (numpy, cfg.param_dtype)."""
  from m1jax import model  # pylint: disable=g-import-not-at-top
  files = _shard_files(ckpt_dir)
  shapes = _checkpoint_shapes(files)
  slots = _model_slots(
      cfg, fused_experts=any(k.endswith(".mlp.experts.gate_up_proj") for k in shapes))
  _check_keys(slots, shapes, ckpt_dir)
  dtype = _NP_DTYPES[cfg.param_dtype]
  abstract = model.abstract_params(cfg)
  params = jax.tree.map(lambda x: np.empty(x.shape, dtype), abstract)
  for path in files:
    with safe_open(path, framework="np") as f:
      for key in f.keys():
        name = _normalise_key(key)
        if not _is_decay_buffer(name):
          slots[name].place(params, f.get_tensor(key).astype(dtype))
  return params


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
