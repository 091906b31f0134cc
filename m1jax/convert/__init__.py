"""HF checkpoint conversion: `load_hf(dir) -> (cfg, params)` and `save_hf(cfg, params, dir)`."""

from __future__ import annotations

import os
from typing import Any

import jax

from m1jax.config import ModelConfig
from m1jax.convert.hf import export_tensors, load_params, save_checkpoint

__all__ = ["load_hf", "save_hf", "export_tensors"]


def load_hf(ckpt_dir: str | os.PathLike, *, shardings=None,
            **config_overrides) -> tuple[ModelConfig, Any]:
  """Reads config.json and (sharded) safetensors, one tensor at a time.

  config_overrides set ModelConfig fields (e.g. dtype="float32", param_dtype="bfloat16").
  shardings: optional pytree of jax.sharding.Sharding matching params (device_put per leaf);
  by default params go to the default device. Returns (cfg, params).
  """
  ckpt_dir = os.fspath(ckpt_dir)
  cfg = ModelConfig.from_hf(ckpt_dir, **config_overrides)
  params = load_params(cfg, ckpt_dir)
  if shardings is None:
    return cfg, jax.tree.map(jax.device_put, params)
  return cfg, jax.tree.map(jax.device_put, params, shardings)


def save_hf(cfg: ModelConfig, params, out_dir: str | os.PathLike, *, dtype: str | None = None,
            max_shard_bytes: int = 5 << 30) -> None:
  """Writes a checkpoint that transformers.MiniMaxForCausalLM.from_pretrained loads.

  dtype: tensor dtype on disk (default cfg.param_dtype). Shards above max_shard_bytes.
  """
  save_checkpoint(cfg, params, os.fspath(out_dir), dtype=dtype, max_shard_bytes=max_shard_bytes)
