r"""Compile time of the forward and of the RL train step (rl_update) against depth.

The layers are scanned over groups of one period of the layout, so compile time should not grow
with the number of layers. Times `jax.jit(f).lower(...)` and `.compile()` on abstract inputs
(nothing is allocated) for the small preset's width at each depth (7:1 layout).

  python -m experiments.bench_compile --layers=16,32,80 --out_dir=results/compile
"""

import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import reporting
from m1jax import config, model
from m1jax.rl import losses
from m1jax.train import optimizer as optimizer_lib, rl, schema, state as state_lib

_LAYERS = flags.DEFINE_list("layers", ["16", "32", "80"], "Depths (multiples of 8).")
_WHAT = flags.DEFINE_list("what", ["forward", "rl_update"], "Functions to compile.")
_PRESET = flags.DEFINE_string("preset", "small", "config.preset giving the width.")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (half of them response).")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/compile", "CSV and log folder.")


def lowered(cfg: config.ModelConfig, what: str, batch: int, seq_len: int):
  """jax.jit(f).lower(...) of model.forward or rl_update on abstract params and inputs."""
  params = model.abstract_params(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  if what == "forward":
    return jax.jit(lambda p, t: model.forward(cfg, p, t).logits).lower(params, tokens)
  optimizer = optimizer_lib.make_optimizer(schema.base_config().rl.optimizer, 100)
  state = jax.eval_shape(lambda p: state_lib.create(p, optimizer), params)
  response = jax.ShapeDtypeStruct((batch, seq_len // 2), jnp.float32)
  batch_spec = rl.RolloutBatch(tokens, jax.ShapeDtypeStruct((batch, seq_len), bool), response,
                               response, jax.ShapeDtypeStruct((batch,), jnp.float32), None)
  step = lambda s, b: rl.rl_update(cfg, losses.LossConfig(kind="cispo"), 1.0, optimizer, s, b)
  return jax.jit(step).lower(state, batch_spec)


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "compile.log"))
  log(reporting.versions())
  rows = []
  for what in _WHAT.value:
    for layers in (int(n) for n in _LAYERS.value):
      cfg = config.preset(_PRESET.value, num_hidden_layers=layers,
                          attn_type_list=config.hybrid_layout(layers), dtype="bfloat16")
      start = time.perf_counter()
      lowered_fn = lowered(cfg, what, _BATCH.value, _SEQ_LEN.value)
      traced = time.perf_counter()
      lowered_fn.compile()
      done = time.perf_counter()
      rows.append([what, layers, f"{traced - start:.1f}", f"{done - traced:.1f}",
                   f"{done - start:.1f}"])
      log(f"{what:10s} layers {layers:3d}: trace + lower {traced - start:6.1f} s, compile "
          f"{done - traced:6.1f} s")
  header = ["function", "layers", "trace + lower s", "compile s", "total s"]
  reporting.write_csv(os.path.join(_OUT_DIR.value, "compile.csv"), header, rows)
  log(reporting.markdown_table(header, rows))


if __name__ == "__main__":
  app.run(main)
