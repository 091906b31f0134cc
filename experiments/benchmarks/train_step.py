"""Sharded RL train step on several meshes: agreement with one device, tokens/s and MFU.

Every mesh runs the same `rl_update` on the same random rollout batch from the same params; the
loss and gradient norm must match the one-device run (bf16 compute: to bf16 tolerance).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from experiments import reporting
from m1jax import flops, model, sharding
from m1jax.config import ModelConfig
from m1jax.rl import losses
from m1jax.train import optimizer as optimizer_lib, rl, schema
from m1jax.train import state as state_lib
from m1jax.train.transfer import to_global


@dataclasses.dataclass
class StepResult:
  mesh: str
  devices: int
  loss: float
  grad_norm: float
  step_ms: float
  tokens_per_s: float
  mfu: float


def rollout_batch(cfg: ModelConfig, rows: int, prompt_len: int, response_len: int, seed: int = 0):
  """A random rollout batch (host numpy) of `rows` sequences of prompt_len + response_len tokens."""
  rng = np.random.default_rng(seed)
  total = prompt_len + response_len
  return rl.RolloutBatch(
      sequences=rng.integers(0, cfg.vocab_size, (rows, total), dtype=np.int32),
      sequence_mask=np.ones((rows, total), bool),
      response_mask=np.ones((rows, response_len), np.float32),
      old_logprobs=-rng.uniform(0, 8, (rows, response_len)).astype(np.float32),
      advantages=rng.standard_normal(rows).astype(np.float32),
      ref_logprobs=None)


def time_mesh(cfg: ModelConfig, params, batch, mesh_shape: Mapping[str, int], devices,
              peak_flops_per_device: float, steps: int = 5) -> StepResult:
  """Compiles rl_update for `mesh_shape` over `devices`, checks nothing is NaN, times `steps`."""
  mesh = sharding.make_mesh(dict(mesh_shape), devices)
  opt_cfg = schema.base_config().rl.optimizer
  opt_cfg.learning_rate = 1e-6
  optimizer = optimizer_lib.make_optimizer(opt_cfg, 100)
  shardings = state_lib.state_shardings(cfg, optimizer, mesh)
  with sharding.activate(mesh):
    state = jax.jit(lambda p: state_lib.create(p, optimizer), out_shardings=shardings)(params)
    batch_d = jax.tree.map(lambda x: to_global(x, mesh), batch)
    step = jax.jit(lambda s, b: rl.rl_update(cfg, losses.LossConfig(kind="cispo"), 1.0,
                                                     optimizer, s, b),
                   in_shardings=(shardings, None), out_shardings=(shardings, None))
    _, metrics = step(state, batch_d)  # compile + first step (from the common starting state)
    first = jax.device_get(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch_d)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  rows, total = batch.sequences.shape
  tokens = rows * total
  step_flops = flops.training_flops_per_token(flops.arch_from_model_config(cfg), total) * tokens
  name = "x".join(f"{k}{v}" for k, v in mesh_shape.items() if v > 1) or "single"
  return StepResult(mesh=name, devices=len(devices), loss=float(first["loss"]),
                    grad_norm=float(first["grad_norm"]), step_ms=seconds * 1e3,
                    tokens_per_s=tokens / seconds,
                    mfu=step_flops / seconds / (peak_flops_per_device * len(devices)))


def run_meshes(cfg: ModelConfig, mesh_shapes: Sequence[Mapping[str, int]], rows: int,
               prompt_len: int, response_len: int, peak_flops_per_device: float,
               log=print) -> list[StepResult]:
  params = model.init(cfg, jax.random.key(0))
  batch = rollout_batch(cfg, rows, prompt_len, response_len)
  results = []
  for shape in mesh_shapes:
    size = int(np.prod(list(shape.values())))
    result = time_mesh(cfg, params, batch, shape, jax.devices()[:size], peak_flops_per_device)
    log(f"{result.mesh:>16} devices {result.devices}  loss {result.loss:.6f}  grad_norm "
        f"{result.grad_norm:.6f}  step {result.step_ms:8.2f} ms  "
        f"{result.tokens_per_s:10.0f} tok/s  MFU {100 * result.mfu:5.1f}%")
    results.append(result)
  return results


def table(results: Sequence[StepResult]) -> str:
  base = results[0]
  rows = []
  for r in results:
    efficiency = r.tokens_per_s / (base.tokens_per_s * r.devices / base.devices)
    rows.append([r.mesh, r.devices, f"{r.loss:.6f}", f"{r.grad_norm:.5f}",
                 f"{abs(r.loss - base.loss) / abs(base.loss):.1e} / "
                 f"{abs(r.grad_norm - base.grad_norm) / base.grad_norm:.1e}", f"{r.step_ms:.1f}",
                 f"{r.tokens_per_s:.0f}", f"{100 * r.mfu:.1f}%", f"{100 * efficiency:.0f}%"])
  return reporting.markdown_table(
      ["mesh", "GPUs", "loss", "grad norm", "rel. diff vs 1 GPU (loss / grad)", "step ms",
       "tokens/s", "MFU", "scaling eff."], rows)
