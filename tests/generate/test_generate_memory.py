"""cache_bytes against the arrays model.init_cache allocates, and the released model's numbers."""

import jax
import jax.numpy as jnp
import pytest

from m1jax import config, generate, model

MIB, GIB = 1 << 20, 1 << 30


@pytest.mark.parametrize("overrides, kv_dtype", [
    (dict(), None),  # 3 lightning + 1 softmax, float32
    (dict(dtype="bfloat16"), None),
    (dict(), "bfloat16"),
    (dict(attn_type_list=(1, 1, 1, 1)), None),  # all softmax
    (dict(attn_type_list=(0, 0, 0, 0)), None),  # all lightning
])
@pytest.mark.parametrize("batch, length", [(1, 7), (3, 64)])
def test_cache_bytes_equals_init_cache_arrays(overrides, kv_dtype, batch, length):
  cfg = config.preset("tiny", **overrides)
  cache = model.init_cache(cfg, batch, length, None if kv_dtype is None else jnp.dtype(kv_dtype))
  size = generate.cache_bytes(cfg, batch, length, kv_dtype)
  assert size.lightning == cache.lightning_states.nbytes
  assert size.softmax == cache.keys.nbytes + cache.values.nbytes
  assert size.total == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_lightning_part_does_not_grow_with_length():
  cfg = config.preset("tiny")
  short, long = (generate.cache_bytes(cfg, 2, n) for n in (16, 16_000))
  assert short.lightning == long.lightning > 0
  assert long.softmax == 1000 * short.softmax


def test_released_model_at_one_million_tokens():
  # Per sequence, bfloat16 KV: 70 lightning layers x 64 heads x 128 x 128 x 4 B = 70 x 4 MiB;
  # 10 softmax layers x (keys + values) x 2^20 slots x 8 kv heads x 128 x 2 B = 10 x 2 x 2 GiB.
  cfg = config.preset("minimax-m1-456b")
  size = generate.cache_bytes(cfg, 1, 1 << 20)
  assert size.lightning == 70 * 4 * MIB == 280 * MIB
  assert size.softmax == 10 * 2 * 2 * GIB == 40 * GIB
  assert generate.cache_bytes(cfg, 1, 1 << 20, "float32").softmax == 80 * GIB
  assert generate.cache_bytes(cfg, 8, 1 << 20).lightning == 8 * 280 * MIB


def test_bad_sizes_name_the_argument():
  cfg = config.preset("tiny")
  with pytest.raises(ValueError, match="length"):
    generate.cache_bytes(cfg, 1, 0)
  with pytest.raises(ValueError, match="batch"):
    generate.cache_bytes(cfg, -1, 4)
