"""Train state, the optimizer step every train step ends with, and the state's placement on a
mesh."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from m1jax import model, sharding
from m1jax.config import ModelConfig
from m1jax.train import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken (skipped non-finite ones included)
  params: Any
  opt_state: Any


def create(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState, grads,
                    metrics: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer step every train step ends with: updates `state` by `grads` and adds
  grad_norm (before clipping), skipped (1 when optax.apply_if_finite skipped the update) and,
  for an injectable optimizer, the learning_rate and grad_clip the update used."""
  with jax.named_scope("optimizer"):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   skipped=(opt_state.notfinite_count > 0).astype(jnp.float32),
                   **optimizer_lib.hyperparams(opt_state))
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state), metrics


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh) -> TrainState:
  """NamedShardings for a TrainState: params by their logical axes, optimizer moments alike,
  counters replicated."""
  abstract_params = model.abstract_params(cfg)
  param_shardings = sharding.param_shardings(model.logical_axes(cfg), abstract_params, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, shard: shard, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)


def abstract_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                   shardings: TrainState):
  """ShapeDtypeStructs (with shardings) of a TrainState: the restore target for checkpoints."""
  shapes = jax.eval_shape(lambda p: create(p, optimizer), model.abstract_params(cfg))
  return jax.tree.map(lambda s, shard: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard),
                      shapes, shardings)
