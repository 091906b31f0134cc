"""Malformed HF checkpoints: every error names the file (and tensor); non-float and (with
check_finite, the default) non-finite weights are rejected by both loaders."""

import jax
import numpy as np
import pytest
import safetensors.numpy

from m1jax import config, convert, model, sharding

CFG = config.preset("tiny", dtype="float32", vocab_size=64, hidden_size=32, intermediate_size=32,
                    num_hidden_layers=2, attn_type_list=(0, 1))
KEY = "model.layers.0.self_attn.qkv_proj.weight"


@pytest.fixture(name="tensors", scope="module")
def _tensors():
  return dict(convert.export_tensors(CFG, model.init(CFG, jax.random.key(0))))


def _write(tmp_path, tensors):
  convert.save_hf(CFG, model.init(CFG, jax.random.key(0)), tmp_path)  # config.json
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              tmp_path / "model.safetensors")
  return tmp_path / "model.safetensors"


def _loaders():
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  shardings = sharding.param_shardings(model.logical_axes(CFG), model.abstract_params(CFG), mesh)
  return {"host": {}, "sharded": {"shardings": shardings}}


@pytest.mark.parametrize("loader", ["host", "sharded"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_broken_safetensors_file_is_named(tmp_path, tensors, loader, damage):
  path = _write(tmp_path, tensors)
  data = path.read_bytes()
  path.write_bytes(b"" if damage == "empty" else data[:len(data) // 2])
  with pytest.raises(ValueError, match="not a readable safetensors file") as info:
    convert.load_hf(tmp_path, **_loaders()[loader])
  assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("loader", ["host", "sharded"])
def test_a_non_float_tensor_is_rejected(tmp_path, tensors, loader):
  path = _write(tmp_path, {**tensors, KEY: tensors[KEY].astype(np.int32)})
  with pytest.raises(ValueError, match=f"{path}: tensor {KEY} is I32; weights must be one of"):
    convert.load_hf(tmp_path, **_loaders()[loader])


@pytest.mark.parametrize("loader", ["host", "sharded"])
def test_check_finite_names_the_first_tensor_with_nan_or_inf(tmp_path, tensors, loader):
  bad = tensors[KEY].copy()
  bad[1, 2] = np.nan
  path = _write(tmp_path, {**tensors, KEY: bad})
  with pytest.raises(ValueError, match=f"{path}: tensor {KEY} holds non-finite values"):
    convert.load_hf(tmp_path, **_loaders()[loader])
  _, params = convert.load_hf(tmp_path, check_finite=False, **_loaders()[loader])
  assert any(not np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_bad_index_is_named(tmp_path, tensors):
  _write(tmp_path, tensors)
  (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "missing.st"}}')
  with pytest.raises(FileNotFoundError, match="model.safetensors.index.json names .*missing.st"):
    convert.load_hf(tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text("[]")
  with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index"):
    convert.load_hf(tmp_path)
