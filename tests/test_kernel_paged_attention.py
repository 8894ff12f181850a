"""paged_prefill_attention / paged_decode_attention (causal GQA attention over the paged KV cache) vs the
eager reference. Pools come from PagedKVCache with pages handed out in a shuffled order and every slot
no step wrote filled with NaN, so a wrong page, slot or key range shows up as a NaN or a mismatch."""
import pytest
import torch

from autoglm_fast.kernels.paged_attention import paged_prefill_attention, reference_paged_attention
from autoglm_fast.kernels.paged_decode import (MAX_SPLITS, decode_config, decode_grid_splits, paged_decode_attention,
                                               split_counters)
from kernel_harness import (DEVICE, DOT_DTYPES, assert_matches, assert_within, nan_like, reference_pair,
                            requires_kernels)
from paged_helpers import GLM, GLM4V, SMALL, cache_args, chunk_step, decode_case, make_cache, queries, run_decode

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
    """Grids of 1, 3, 5 and 16 splits (short sequences use fewer, trailing programs exit), with the default
    128-key minimum and with min_chunk=1 (splits of a single 64-key tile, the last one 1 key long)."""
    torch.manual_seed(1)
    q, meta, cache = decode_case(SMALL, 16, dtype, [300, 17, 1, 129])
    exact, eager = reference_pair(reference_paged_attention, q, *cache_args(cache, meta))
    for n, min_chunk in ((1, 128), (3, 128), (5, 1), (16, 1)):
        assert_within(run_decode(q, meta, cache, num_splits=n, min_chunk=min_chunk), exact, eager)
    assert not split_counters(DEVICE).any()  # every merge left its counter at 0


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_decode_ragged_batch_fused_merge(dtype):
    """One launch of 16 grid splits where the sequences use 1, 2 (the second holds one key), 6 and 16 splits:
    each sequence's last split merges only its own partials."""
    torch.manual_seed(3)
    q, meta, cache = decode_case(SMALL, 32, dtype, [1, 129, 700, 2000, 64], num_blocks=100)
    assert_matches(run_decode(q, meta, cache, num_splits=16), reference_paged_attention, q, *cache_args(cache, meta))
    assert not split_counters(DEVICE).any()


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("shape", [GLM, GLM4V], ids=["gqa14", "gqa16"])
def test_decode_glm_groups_at_head_dim_128(dtype, shape):
    """The backbones' 28 / 2 and 32 / 2 heads: one program holds the whole group of 14 / 16 query heads."""
    torch.manual_seed(shape[0])
    q, meta, cache = decode_case(shape, 32, dtype, [700, 3, 129])
    assert_matches(run_decode(q, meta, cache), reference_paged_attention, q, *cache_args(cache, meta))


def test_decode_32k_context():
    """A 32k context (all 64 splits of 512 keys, the long config) beside a 1000-token one (8 splits of 128), at
    small heads (one KV head, group 4, head_dim 8) so the interpreter gets through it."""
    torch.manual_seed(32)
    shape, lens = (4, 1, 8), [32768, 1000]
    q, meta, cache = decode_case(shape, 32, torch.float16, lens, num_blocks=sum(-(-n // 32) for n in lens) + 4)
    assert decode_config(meta.max_seq_len, MAX_SPLITS) == "long"
    assert_matches(run_decode(q, meta, cache), reference_paged_attention, q, *cache_args(cache, meta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_counters_reset_between_launches(dtype):
    """Two launches in a row on the same counters give the same right answer (a counter left at n would
    make the second launch merge early or never), and leave every counter at 0."""
    torch.manual_seed(4)
    q, meta, cache = decode_case(SMALL, 16, dtype, [500, 260])
    exact, eager = reference_pair(reference_paged_attention, q, *cache_args(cache, meta))
    counters = split_counters(DEVICE)
    for _ in range(2):
        assert_within(run_decode(q, meta, cache, num_splits=4), exact, eager)
        assert split_counters(DEVICE) is counters and not counters.any()


def _static_step(cache, meta, rows, tables, lens, q):
    """Overwrite the static tables / lens buffers in place with sequences `rows` of meta, as a graph's step does."""
    tables.copy_(meta.block_tables[rows])
    lens.copy_(meta.seq_lens[rows])
    qsl = torch.arange(len(rows) + 1, dtype=torch.int32, device=DEVICE)
    return (q, cache.k_pools[0], cache.v_pools[0], tables, lens, qsl)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_decode_plan_replays_on_static_buffers(dtype):
    """The per-step split plan under the static-buffer path: the grid fixed once by the bound (as by
    max_model_len in the decode graph), seq_lens and block tables overwritten in place between launches;
    each launch splits by the lengths it reads (3 + 1 splits, then 16 + 2)."""
    torch.manual_seed(5)
    q_all, meta, cache = decode_case(SMALL, 16, dtype, [300, 20, 1990, 150], num_blocks=160)
    bound = meta.max_seq_len
    tables = torch.zeros(2, meta.block_tables.shape[1], dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for rows in ([0, 1], [2, 3]):
        q = q_all[rows]
        args = _static_step(cache, meta, rows, tables, lens, q)
        out = nan_like(q.shape, dtype)
        paged_decode_attention(q, *args[1:5], bound, num_splits=16, out=out)
        assert_matches(out, reference_paged_attention, *args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [GLM, GLM4V], ids=["gqa14", "gqa16"])
@pytest.mark.parametrize("lens", [[32768], [32768, 24000, 200, 1, 33, 4096 + 17]], ids=["32k", "ragged"])
def test_decode_real_shapes_up_to_32k(dtype, shape, lens):
    """The real heads at contexts up to 32k, default plan: alone (every split of the grid) and ragged (from one
    split for sequences shorter than a chunk to all of the grid's)."""
    torch.manual_seed(7)
    q, meta, cache = decode_case(shape, 32, dtype, lens, num_blocks=sum(-(-n // 32) for n in lens) + 8)
    assert_matches(run_decode(q, meta, cache), reference_paged_attention, q, *cache_args(cache, meta))
    assert not split_counters(DEVICE).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_decode_cuda_graph_replays_any_context(dtype):
    """One launch captured in a CUDA graph at the bound 32768, replayed at a 2k and a 32k context written into
    the static buffers: each replay plans its own splits in the kernel and merges them."""
    torch.manual_seed(8)
    lens = [2048 + 5, 32768]
    q_all, meta, cache = decode_case(GLM, 32, dtype, lens, num_blocks=sum(-(-n // 32) for n in lens) + 8)
    tables = meta.block_tables[:1].clone()
    seq_lens = meta.seq_lens[:1].clone()
    q, out = q_all[:1].clone(), nan_like((1, *q_all.shape[1:]), dtype)
    run = lambda: paged_decode_attention(q, cache.k_pools[0], cache.v_pools[0], tables, seq_lens, 32768,  # noqa: E731
                                         out=out)
    run()  # warm-up: compiles, allocates the counters before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for row in (0, 1, 0):
        args = _static_step(cache, meta, [row], tables, seq_lens, q)
        q.copy_(q_all[row:row + 1])
        out.fill_(float("nan"))
        graph.replay()
        assert_matches(out, reference_paged_attention, *args)
    assert not split_counters(DEVICE).any()


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


def test_split_plan():
    # The grid: 2 * 132 SMs (the CPU fallback) over the (sequence, KV head) pairs, <= MAX_SPLITS, <= the bound's
    # 128-key chunks. Each launch's config: "long" once a split reaches 512 keys.
    assert decode_grid_splits(1, 2, 128, "cpu") == 1
    assert decode_grid_splits(1, 2, 255, "cpu") == 2
    assert decode_grid_splits(1, 2, 2048, "cpu") == 16
    assert decode_grid_splits(1, 2, 32768, "cpu") == MAX_SPLITS == 64
    assert decode_grid_splits(8, 2, 4096, "cpu") == 17
    assert decode_grid_splits(8, 2, 32768, "cpu") == 17
    assert decode_grid_splits(256, 2, 32768, "cpu") == 1
    assert decode_config(4096, 16) == "short" and decode_config(32768, 64) == "long"
    assert decode_config(300, 1) == "short" and decode_config(32768, 1) == "long"


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
    with pytest.raises(ValueError, match="min_chunk must be a positive int"):
        paged_decode_attention(q, kp, vp, bt, sl, 20, min_chunk=0)
    with pytest.raises(ValueError, match="out must have shape"):
        paged_decode_attention(q, kp, vp, bt, sl, 20, out=torch.empty(2, 6, 11, device=q.device))
