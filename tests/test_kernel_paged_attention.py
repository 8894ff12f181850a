"""paged_prefill_attention / paged_decode_attention (causal GQA attention over the paged KV cache) vs the
eager reference. Pools come from PagedKVCache with pages handed out in a shuffled order and every slot
no step wrote filled with NaN, so a wrong page, slot or key range shows up as a NaN or a mismatch."""
import pytest
import torch

from autoglm_fast.kernels.paged_attention import paged_prefill_attention, reference_paged_attention
from autoglm_fast.kernels.paged_decode import MAX_SPLITS, decode_num_splits, paged_decode_attention
from kernel_harness import DOT_DTYPES, assert_matches, assert_within, nan_like, reference_pair, requires_kernels
from paged_helpers import GLM, SMALL, cache_args, chunk_step, decode_case, make_cache, queries, run_decode

pytestmark = requires_kernels


def run_prefill(cache, meta, shape, dtype):
    q = queries(meta.query_start_loc[-1].item(), *shape, dtype)
    out = nan_like(q.shape, dtype)
    got = paged_prefill_attention(q, *cache_args(cache, meta), meta.max_query_len, out=out,
                                  max_seq_len=meta.max_seq_len)
    assert got is out
    assert_matches(got, reference_paged_attention, q, *cache_args(cache, meta))


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("lens", [[1], [81], [300, 17, 64]])
def test_prefill_whole_sequences(dtype, block_size, lens):
    torch.manual_seed(sum(lens) + block_size)
    cache = make_cache(*SMALL, block_size, dtype)
    run_prefill(cache, chunk_step(cache, [0] * len(lens), lens), SMALL, dtype)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_chunked_prefill_on_cached_prefix(dtype, block_size):
    """New chunks on top of cached tokens (prefix reuse): 7 on 40, 81 on 222 (the chunk starts two keys before
    a tile edge, where an off-by-one in the unmasked range would show a future key) and a fresh 17 tokens."""
    torch.manual_seed(block_size)
    cache = make_cache(*SMALL, block_size, dtype)
    run_prefill(cache, chunk_step(cache, [40, 222, 0], [7, 81, 17]), SMALL, dtype)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("lens", [[1], [17], [64], [81], [300], [300, 1, 81]])
def test_decode_matches_reference(dtype, block_size, lens):
    torch.manual_seed(sum(lens))
    q, meta, cache = decode_case(SMALL, block_size, dtype, lens)
    assert_matches(run_decode(q, meta, cache), reference_paged_attention, q, *cache_args(cache, meta))


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_decode_split_counts_agree(dtype):
    """1, 2, 3 and 5 splits (the short sequences leave trailing splits empty) give the same result."""
    torch.manual_seed(1)
    q, meta, cache = decode_case(SMALL, 16, dtype, [300, 17, 1, 129])
    exact, eager = reference_pair(reference_paged_attention, q, *cache_args(cache, meta))
    for n in (1, 2, 3, 5):
        assert_within(run_decode(q, meta, cache, num_splits=n), exact, eager)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_gqa_group_14_at_head_dim_128(dtype):
    """The backbone's 28 / 2 heads, one small case each: a 5-token chunk on 40 cached, and split decode."""
    torch.manual_seed(14)
    cache = make_cache(*GLM, 32, dtype, num_blocks=16)
    run_prefill(cache, chunk_step(cache, [40], [5]), GLM, dtype)
    q, meta, cache = decode_case(GLM, 32, dtype, [70, 3])
    assert_matches(run_decode(q, meta, cache, num_splits=2), reference_paged_attention, q, *cache_args(cache, meta))


def test_pools_are_read_through_their_strides():
    """K and V interleaved in one buffer ([blocks, 2, block_size, kv, d]): non-contiguous pools, never copied."""
    torch.manual_seed(2)
    q, meta, cache = decode_case(SMALL, 16, torch.float32, [81, 30])
    both = torch.stack([cache.k_pools[0], cache.v_pools[0]], dim=1)
    kp, vp = both[:, 0], both[:, 1]
    assert not kp.is_contiguous()
    got = paged_decode_attention(q, kp, vp, meta.block_tables, meta.seq_lens, meta.max_seq_len, num_splits=3)
    args = (kp, vp, meta.block_tables, meta.seq_lens, meta.query_start_loc)
    assert_matches(got, reference_paged_attention, q, *args)
    got = paged_prefill_attention(q, *args, 1, scale=0.7)  # and an explicit softmax scale
    assert_matches(got, reference_paged_attention, q, *args, scale=0.7)


def test_split_heuristic():
    # 2 * 132 SMs (the CPU fallback) over the (sequence, KV head) programs, >= 256 keys a split, at most MAX_SPLITS
    assert decode_num_splits(1, 2, 255, "cpu") == 1
    assert decode_num_splits(1, 2, 1024, "cpu") == 4
    assert decode_num_splits(1, 2, 32768, "cpu") == MAX_SPLITS
    assert decode_num_splits(8, 2, 4096, "cpu") == 16
    assert decode_num_splits(8, 2, 32768, "cpu") == 17
    assert decode_num_splits(256, 2, 32768, "cpu") == 1


def test_bad_inputs_name_the_argument():
    q, meta, cache = decode_case(SMALL, 16, torch.float32, [20, 3])
    kp, vp, bt, sl, qsl = cache.k_pools[0], cache.v_pools[0], meta.block_tables, meta.seq_lens, meta.query_start_loc
    with pytest.raises(TypeError, match="k_pool has dtype torch.float16 but the input is torch.float32"):
        paged_decode_attention(q, kp.half(), vp, bt, sl, 20)
    with pytest.raises(TypeError, match="q has dtype torch.int64"):
        paged_decode_attention(q.long(), kp, vp, bt, sl, 20)
    with pytest.raises(TypeError, match="block_tables has dtype torch.int64"):
        paged_decode_attention(q, kp, vp, bt.long(), sl, 20)
    with pytest.raises(TypeError, match="seq_lens has dtype torch.int64"):
        paged_prefill_attention(q, kp, vp, bt, sl.long(), qsl, 1)
    with pytest.raises(TypeError, match="query_start_loc has dtype torch.int64"):
        paged_prefill_attention(q, kp, vp, bt, sl, qsl.long(), 1)
    with pytest.raises(ValueError, match="q is on meta"):
        paged_decode_attention(q.to("meta"), kp, vp, bt, sl, 20)
    with pytest.raises(ValueError, match="k_pool is on meta"):
        paged_prefill_attention(q, kp.to("meta"), vp, bt, sl, qsl, 1)
    with pytest.raises(ValueError, match="q has 5 heads, not a multiple of the cache's 2 KV heads"):
        paged_decode_attention(q[:, :5], kp, vp, bt, sl, 20)
    with pytest.raises(ValueError, match="q's head_dim 8 does not match the cache's head_dim 12"):
        paged_prefill_attention(q[..., :8], kp, vp, bt, sl, qsl, 1)
    with pytest.raises(ValueError, match="v_pool must have shape"):
        paged_decode_attention(q, kp, vp[:, :8], bt, sl, 20)
    with pytest.raises(ValueError, match="block table too short"):
        paged_decode_attention(q, kp, vp, bt, sl, 33)
    with pytest.raises(ValueError, match="block table too short"):
        paged_prefill_attention(q, kp, vp, bt[:, :1], sl, qsl, 1)  # max_seq_len read from seq_lens
    with pytest.raises(ValueError, match="block_tables must have one row per sequence"):
        paged_decode_attention(q, kp, vp, bt[:1], sl, 20)
    with pytest.raises(ValueError, match="query_start_loc must have shape \\(3,\\)"):
        paged_prefill_attention(q, kp, vp, bt, sl, qsl[:2], 1)
    with pytest.raises(ValueError, match="max_query_len must be an int"):
        paged_prefill_attention(q, kp, vp, bt, sl, qsl, 0)
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        paged_decode_attention(q, kp, vp, bt, sl, 20, num_splits=0)
    with pytest.raises(ValueError, match="out must have shape"):
        paged_decode_attention(q, kp, vp, bt, sl, 20, out=torch.empty(2, 6, 11, device=q.device))
