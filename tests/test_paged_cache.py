"""PagedKVCache: block allocation and freeing, and the per-step metadata the kernels read."""
import pytest
import torch

from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.paged_cache import PagedKVCache

TEXT = AutoGLMPhoneConfig.preset("nano").text


def test_pool_layout_and_memory_sizing():
    cache = PagedKVCache(TEXT, num_blocks=5, block_size=16, dtype=torch.float32)
    assert len(cache.k_pools) == TEXT.num_hidden_layers
    assert cache.k_pools[0].shape == (5, 16, TEXT.num_key_value_heads, TEXT.head_dim)
    per_block = TEXT.kv_cache_bytes_per_token(2) * 32
    assert PagedKVCache.for_memory(TEXT, 10 * per_block + 1).num_blocks == 10


def test_step_metadata_by_hand():
    cache = PagedKVCache(TEXT, num_blocks=8, block_size=4, dtype=torch.float32)
    meta = cache.step(["a", "b"], [6, 1])           # a: 6 tokens -> 2 blocks; b: 1 token -> 1 block
    assert meta.query_start_loc.tolist() == [0, 6, 7]
    assert meta.seq_lens.tolist() == [6, 1] and meta.max_query_len == 6 and meta.max_seq_len == 6
    assert meta.positions.tolist() == [0, 1, 2, 3, 4, 5, 0]
    a_blocks, b_blocks = meta.block_tables.tolist()
    assert len(set(a_blocks) | {b_blocks[0]}) == 3 and not meta.is_decode
    expect = [a_blocks[p // 4] * 4 + p % 4 for p in range(6)] + [b_blocks[0] * 4]
    assert meta.slot_mapping.tolist() == expect
    meta = cache.step(["b", "a"], [1, 1])           # decode: b at position 1, a at 6
    assert meta.is_decode and meta.positions.tolist() == [1, 6] and meta.seq_lens.tolist() == [2, 7]
    assert meta.block_tables[1, :2].tolist() == a_blocks  # a keeps its pages and grows in place
    assert cache.seq_len("a") == 7 and cache.num_free_blocks == 5
    assert meta.block_tables.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64


def test_free_returns_blocks_and_out_of_blocks_changes_nothing():
    cache = PagedKVCache(TEXT, num_blocks=3, block_size=4, dtype=torch.float32)
    cache.step(["a"], [8])
    assert cache.num_free_blocks == 1
    with pytest.raises(RuntimeError, match="out of blocks: the step needs 2, 1 free"):
        cache.step(["a", "b"], [1, 4])
    assert cache.seq_len("a") == 8 and cache.seq_len("b") == 0 and cache.num_free_blocks == 1
    assert not cache.can_append(["b"], [5]) and cache.can_append(["b"], [4])
    cache.free("a")
    assert cache.num_free_blocks == 3 and cache.seq_len("a") == 0
    cache.free("never-seen")  # aborting an unknown request is harmless


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_blocks=4, block_size=24), "power of two"),
    (dict(num_blocks=0), "num_blocks must be positive"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedKVCache(TEXT, **kwargs)


def test_bad_steps():
    cache = PagedKVCache(TEXT, num_blocks=4, block_size=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="same sequence twice"):
        cache.step(["a", "a"], [1, 1])
    with pytest.raises(ValueError, match=">= 1"):
        cache.step(["a"], [0])
    with pytest.raises(ValueError, match="one num_new_tokens entry per sequence"):
        cache.step(["a", "b"], [1])
