"""HF checkpoint conversion: `load_hf(dir) -> (cfg, params)` and `save_hf(cfg, params, dir)`."""

from __future__ import annotations

import os
from typing import Any

import jax

from m1jax.config import ModelConfig
from m1jax.convert.hf import LoadPlan, export_tensors, load_params, load_plan, load_sharded
from m1jax.convert.hf import save_checkpoint

__all__ = ["load_hf", "save_hf", "export_tensors", "load_plan", "LoadPlan"]


def load_hf(ckpt_dir: str | os.PathLike, *, shardings=None, check_finite: bool = True,
            **config_overrides) -> tuple[ModelConfig, Any]:
  """Reads config.json and (sharded) safetensors -> (cfg, params).

  config_overrides set ModelConfig fields (e.g. dtype="float32", param_dtype="bfloat16").
  shardings: a pytree of jax.sharding.Sharding matching params (e.g. sharding.param_shardings):
  each tensor is streamed into the blocks of the devices that hold it, reading only those
  slices, so a process holds about one block in host memory (`load_plan` gives the numbers;
  the shardings are a function of cfg, so build them from ModelConfig.from_hf(ckpt_dir)).
  Without shardings the params are assembled on the host, one tensor at a time, then placed on
  the default device (host memory: the whole model). Errors name the file and tensor: a file
  that is not safetensors (empty, truncated), a tensor that is not floating point, and with
  `check_finite` a tensor holding NaN or inf.
  """
  ckpt_dir = os.fspath(ckpt_dir)
  cfg = ModelConfig.from_hf(ckpt_dir, **config_overrides)
  if shardings is not None:
    return cfg, load_sharded(cfg, ckpt_dir, shardings, check_finite=check_finite)
  return cfg, jax.tree.map(jax.device_put, load_params(cfg, ckpt_dir, check_finite=check_finite))


def save_hf(cfg: ModelConfig, params, out_dir: str | os.PathLike, *, dtype: str | None = None,
            max_shard_bytes: int = 5 << 30) -> None:
  """Writes a checkpoint that transformers.MiniMaxForCausalLM.from_pretrained loads.

  dtype: tensor dtype on disk (default cfg.param_dtype). Shards above max_shard_bytes.
  """
  save_checkpoint(cfg, params, os.fspath(out_dir), dtype=dtype, max_shard_bytes=max_shard_bytes)
