"""model.init: the values of the one numpy stream, and a sharded init that builds only the local
blocks of each leaf with the same values."""

import tracemalloc

import jax
import numpy as np

from m1jax import config, model, sharding

CFG = config.preset("tiny", vocab_size=264, hidden_size=256, intermediate_size=256,
                    num_hidden_layers=8, attn_type_list=(0, 0, 0, 1) * 2)


def _expected(cfg, seed):
  """The init transcribed: one PCG64 stream, tensors in the sorted order of per-layer names,
  normal(0, initializer_range) in float32, ones for norm scales -> {name: array}."""
  tensors = {}
  shapes = model.abstract_params(cfg)
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    if keys[0] != "layers":
      tensors["/".join(keys)] = leaf.shape
      continue
    for group in range(leaf.shape[0]):
      layer = group * cfg.layer_period + int(keys[1].removeprefix("layer_"))
      tensors["/".join((f"layers_{layer}",) + keys[2:])] = leaf.shape[1:]
  rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.key(seed))).tolist())
  out = {}
  for name in sorted(tensors, key=lambda n: tuple(n.split("/"))):
    if name.endswith("scale"):
      out[name] = np.ones(tensors[name], np.float32)
    else:
      out[name] = rng.standard_normal(tensors[name], np.float32) * np.float32(0.02)
  return out


def _check_values(cfg, params, expected):
  np.testing.assert_array_equal(np.asarray(params["embed"]), expected["embed"])
  np.testing.assert_array_equal(np.asarray(params["lm_head"]), expected["lm_head"])
  for layer in range(cfg.num_hidden_layers):
    flat = jax.tree_util.tree_flatten_with_path(model.layer_params(cfg, params, layer))[0]
    for path, value in flat:
      name = "/".join((f"layers_{layer}",) + tuple(k.key for k in path))
      np.testing.assert_array_equal(np.asarray(value), expected[name], err_msg=name)


def test_init_draws_the_documented_stream():
  _check_values(CFG, model.init(CFG, jax.random.key(3)), _expected(CFG, 3))


def test_sharded_init_same_values_only_local_blocks_on_the_host(blocks_copied_to_devices):
  del blocks_copied_to_devices
  mesh = sharding.make_mesh({"fsdp": 4, "expert": 2}, jax.devices()[:8])
  shapes = model.abstract_params(CFG)
  shardings = sharding.param_shardings(model.logical_axes(CFG), shapes, mesh)
  tracemalloc.start()
  params = model.init(CFG, jax.random.key(3), shardings)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  _check_values(CFG, params, _expected(CFG, 3))
  for leaf, expected in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert leaf.sharding == expected
  total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))
  largest_leaf = max(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))
  largest_tensor = max(leaf.size // leaf.shape[0] * leaf.dtype.itemsize
                       for leaf in jax.tree.leaves(shapes["layers"]))
  # One leaf's local blocks (here the whole leaf: one process holds every device) plus the draw
  # of one tensor and its float32 temporaries; the whole model is 13x the largest leaf.
  assert peak <= largest_leaf + 3 * max(largest_tensor, shapes["embed"].size * 4) + (2 << 20)
  assert peak < total / 3
  print(f"peak {peak / 2**20:.2f} MiB; largest leaf {largest_leaf / 2**20:.2f} MiB; "
        f"model {total / 2**20:.2f} MiB")
