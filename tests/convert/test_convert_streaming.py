"""load_hf with shardings streams each tensor into the blocks of the devices that hold it: same
values as the host load, the requested shardings, and host memory of about one block."""

import json
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from jax.sharding import AbstractMesh

from m1jax import config, convert, model, sharding
from m1jax.convert import hf

# Largest checkpoint tensors: embed and lm_head [8192, 256] float32, 8 MiB each; every layer
# tensor is at most 256 KiB (4 experts of [256, 256] per layer).
CFG = config.preset("tiny", dtype="float32", vocab_size=8192, hidden_size=256,
                    intermediate_size=256, num_hidden_layers=8, attn_type_list=(0, 0, 0, 1) * 2)
MESHES = [{"fsdp": 8}, {"fsdp": 2, "tensor": 2, "expert": 2}, {"data": 2, "fsdp": 2, "tensor": 2}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """The same random params saved per-expert over several files, and with fused expert names."""
  params = model.init(CFG, jax.random.key(1))
  params = jax.tree.map(lambda x: x + 0.1 * (x == 1), params)  # norm scales off 1
  per_expert = tmp_path_factory.mktemp("per_expert")
  convert.save_hf(CFG, params, per_expert, max_shard_bytes=4 << 20)
  assert len([f for f in os.listdir(per_expert) if f.endswith(".safetensors")]) > 3
  fused = tmp_path_factory.mktemp("fused")
  tensors = dict(convert.export_tensors(CFG, params))
  for i in range(CFG.num_hidden_layers):
    moe = f"model.layers.{i}.block_sparse_moe.experts"
    pop = lambda name: np.stack([tensors.pop(f"{moe}.{x}.{name}.weight")
                                 for x in range(CFG.num_local_experts)])
    w1, w3, w2 = pop("w1"), pop("w3"), pop("w2")
    tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([w1, w3], axis=1)
    tensors[f"model.layers.{i}.mlp.experts.down_proj"] = w2
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              fused / "model.safetensors")
  (fused / "config.json").write_text((per_expert / "config.json").read_text())
  return params, per_expert, fused


def _shardings(mesh_shape):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
  return sharding.param_shardings(model.logical_axes(CFG), model.abstract_params(CFG), mesh)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("names", ["per_expert", "fused"])
def test_sharded_load_equals_host_load(checkpoints, mesh_shape, names):
  params, per_expert, fused = checkpoints
  shardings = _shardings(mesh_shape)
  _, loaded = convert.load_hf(per_expert if names == "per_expert" else fused,
                              shardings=shardings, dtype="float32")
  for got, want, expected_sharding in zip(jax.tree.leaves(loaded), jax.tree.leaves(params),
                                          jax.tree.leaves(shardings)):
    assert got.sharding == expected_sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit-exact: a copy


def test_bfloat16_params_from_a_float32_checkpoint(checkpoints):
  params, per_expert, _ = checkpoints
  _, loaded = convert.load_hf(per_expert, shardings=_shardings({"fsdp": 8}),
                              param_dtype="bfloat16")
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(jnp.bfloat16))


def test_peak_host_memory_is_about_one_block(checkpoints, blocks_copied_to_devices):
  del blocks_copied_to_devices
  _, per_expert, _ = checkpoints
  cfg = config.ModelConfig.from_hf(per_expert, dtype="float32")
  shardings = _shardings({"fsdp": 8})
  plan = hf.load_plan(cfg, shardings, checkpoint_dtype="float32")
  # Warm the shape tracing and the per-sharding programs (Python objects, not params), so the
  # measurement does not depend on which tests ran before in this process.
  jax.block_until_ready(hf.load_sharded(cfg, str(per_expert), shardings))
  tracemalloc.start()
  loaded = hf.load_sharded(cfg, str(per_expert), shardings)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  jax.block_until_ready(loaded)
  # The plan: the largest block is an eighth of embed / lm_head (1 MiB), plus the slice read
  # into it (1 MiB). Measured: the plan plus about 2 MiB of shape tracing and Python objects.
  assert plan.peak_host_bytes == 2 << 20
  assert plan.largest_tensor_bytes == 8 << 20 and plan.total_bytes > 40 << 20
  assert peak <= plan.peak_host_bytes + (3 << 20), (peak, plan)
  assert peak < plan.largest_tensor_bytes  # less than one tensor; the host load holds them all
  print(f"peak {peak / 2**20:.2f} MiB; {plan.describe()}")


def test_each_element_is_read_once_per_block(checkpoints, monkeypatch):
  """Slices, not whole tensors: the bytes read equal the distinct blocks' bytes."""
  _, per_expert, _ = checkpoints
  shardings = _shardings({"fsdp": 2, "tensor": 2, "expert": 2})
  read = []
  original = hf._Piece.value

  def counting(self, tensor, box=None):
    out = original(self, tensor, box)
    read.append(out.size)
    return out

  monkeypatch.setattr(hf._Piece, "value", counting)
  hf.load_sharded(config.ModelConfig.from_hf(per_expert, dtype="float32"), str(per_expert),
                  shardings)
  shapes = model.abstract_params(CFG)
  distinct = sum(int(np.prod(s.shard_shape(leaf.shape))) * len(sharding.local_blocks(s, leaf.shape))
                 for leaf, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))
  assert sum(read) == distinct < 8 * sum(leaf.size for leaf in jax.tree.leaves(shapes))


def test_dry_run_plan_for_the_456b_preset():
  """Abstract meshes: nothing is allocated or read; the numbers follow from the shapes."""
  cfg = config.preset("minimax-m1-456b", param_dtype="bfloat16")
  shapes = model.abstract_params(cfg)
  total = 2 * model.param_counts(cfg)["total"]
  plans = {}
  for mesh_shape in ((1, 8, 1, 1), (1, 8, 1, 8)):
    mesh = AbstractMesh(mesh_shape, sharding.MESH_AXES)
    shardings = sharding.param_shardings(model.logical_axes(cfg), shapes, mesh)
    plans[mesh_shape] = hf.load_plan(cfg, shardings)
  one_host, eight_hosts = plans[(1, 8, 1, 1)], plans[(1, 8, 1, 8)]
  assert one_host.total_bytes == total and one_host.devices == 8
  assert eight_hosts.devices == 64
  # Expert weights [10, 32, 6144, 9216] over fsdp = 8: a block of 4 experts' rows... 4.2 GiB.
  w1_block = 10 * 32 * (6144 // 8) * 9216 * 2
  assert w1_block <= one_host.peak_host_bytes <= w1_block + 9216 * 768 * 2 * 2
  assert eight_hosts.peak_host_bytes < eight_hosts.largest_tensor_bytes  # embed: 2.3 GiB
  assert total / 8 <= one_host.bytes_per_device < total / 7  # norms are replicated
  assert eight_hosts.bytes_per_device < one_host.bytes_per_device / 5
  print(json.dumps({str(k): v.describe() for k, v in plans.items()}, indent=1))
