"""A paged KV cache as the kernels meet it: pages handed out in a shuffled order, every slot no step wrote
filled with NaN, K/V written through slot_mapping, q as a row-strided view of the fused qkv rows."""
import torch

from autoglm_fast.config import TextConfig
from autoglm_fast.paged_cache import PagedKVCache
from autoglm_fast.kernels.paged_decode import paged_decode_attention
from kernel_harness import DEVICE, nan_like, randn

SMALL = (6, 2, 12)  # the nano model: 6 query heads, 2 KV heads (group 3), head_dim 12
GLM = (28, 2, 128)  # the real backbone: group 14
GLM4V = (32, 2, 128)  # GLM-4.1V's backbone: group 16


def make_cache(heads, kv_heads, head_dim, block_size, dtype, num_blocks=64):
    cfg = TextConfig(vocab_size=8, hidden_size=heads * head_dim, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    cache = PagedKVCache(cfg, num_blocks, block_size, dtype, DEVICE)
    cache.k_pools[0].fill_(float("nan"))
    cache.v_pools[0].fill_(float("nan"))
    # Free one-page sequences in a shuffled order: later pages come off the stack non-contiguous, non-monotonic.
    fillers = [("filler", i) for i in range(num_blocks)]
    cache.step(fillers, [1] * num_blocks)
    for i in torch.randperm(num_blocks, generator=torch.Generator().manual_seed(block_size)).tolist():
        cache.free(fillers[i])
    return cache


def append(cache, seq_ids, counts):
    """One step: reserve pages and write random K/V for the new tokens through slot_mapping."""
    meta = cache.step(seq_ids, counts)
    dtype, (_, _, kv_heads, head_dim) = cache.k_pools[0].dtype, cache.k_pools[0].shape
    for pool in (cache.k_pools[0], cache.v_pools[0]):
        pool.view(-1, kv_heads, head_dim)[meta.slot_mapping] = randn(len(meta.slot_mapping), kv_heads, head_dim,
                                                                     dtype=dtype)
    return meta


def chunk_step(cache, cached, new):
    """Sequence i has cached[i] tokens from earlier steps (0: none) and new[i] tokens this step."""
    earlier = [(i, c) for i, c in enumerate(cached) if c]
    if earlier:
        append(cache, [i for i, _ in earlier], [c for _, c in earlier])
    return append(cache, list(range(len(new))), list(new))


def queries(tokens, heads, kv_heads, head_dim, dtype):
    """q as the projection output hands it over: a row-strided view of the fused qkv rows."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    return qkv[:, :heads * head_dim].view(tokens, heads, head_dim)


def decode_case(shape, block_size, dtype, lens, num_blocks=64):
    """Cache holding lens[i] - 1 earlier tokens per sequence plus this step's one token; returns (q, meta, cache)."""
    cache = make_cache(*shape, block_size, dtype, num_blocks)
    meta = chunk_step(cache, [n - 1 for n in lens], [1] * len(lens))
    assert meta.is_decode
    return queries(len(lens), *shape, dtype), meta, cache


def run_decode(q, meta, cache, num_splits=None, **kw):
    out = nan_like(q.shape, q.dtype)
    got = paged_decode_attention(q, cache.k_pools[0], cache.v_pools[0], meta.block_tables, meta.seq_lens,
                                 meta.max_seq_len, num_splits=num_splits, out=out, **kw)
    assert got is out
    return got


def cache_args(cache, meta):
    """(k_pool, v_pool, block_tables, seq_lens, query_start_loc): what the kernels and the reference read."""
    return cache.k_pools[0], cache.v_pools[0], meta.block_tables, meta.seq_lens, meta.query_start_loc
