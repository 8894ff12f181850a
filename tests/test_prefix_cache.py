"""Automatic prefix caching: block hashes (media included), sharing, LRU eviction, aborts and
preemption; a request that starts on cached blocks answers as it does with caching off.

Greedy runs with and without the cache compute the shared prefix in different shapes (one prefill
against a prefill plus a short one over cached K/V), so they are compared as tests/agreement.py
says: the same tokens except at a near tie, and logprobs within fp32 rounding. A block reused
with the wrong content (another image, another prefix) moves logprobs by orders of magnitude more."""
import pytest
import torch

from agreement import assert_same_greedy
from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from autoglm_fast.paged_cache import PagedKVCache
from autoglm_fast.prefix_cache import extend_block_hashes, tensor_digest
from kernel_harness import requires_kernels

TEXT = AutoGLMPhoneConfig.preset("nano").text
GREEDY = SamplingParams.greedy(max_tokens=3, ignore_eos=True, logprobs=2)
NEAR_TIE = 1e-4
LOGPROB_TOL = 1e-4  # fp32 across shapes moves nano logprobs by ~1e-6; a wrong block by > 1e-2
PREFIX = [(7 * i + 3) % 200 + 20 for i in range(200)]  # 200 token ids shared by two prompts
PREFIX_TEXT = "".join(chr(97 + (7 * i) % 26) for i in range(200))  # 200 byte tokens, on nano


def _hashes(ids, block_size=4, keys=()):
    out = []
    extend_block_hashes(out, ids, block_size, list(keys))
    return out


# ---- hashes ----------------------------------------------------------------------------------------
def test_block_hashes_chain_tokens_and_media():
    a = _hashes(list(range(10)))
    assert len(a) == 2  # full blocks only
    assert _hashes(list(range(10)))[:2] == a and len(set(a)) == 2
    assert _hashes([0, 1, 2, 3, 9, 5, 6, 7])[0] == a[0] and _hashes([0, 1, 2, 3, 9, 5, 6, 7])[1] != a[1]
    assert _hashes([9] + list(range(1, 8)))[1] != a[1]  # chained: a change upstream changes every later hash
    img1, img2 = tensor_digest(torch.zeros(2, 3)), tensor_digest(torch.ones(2, 3))
    assert img1 != img2 != tensor_digest(torch.zeros(3, 2))  # the shape counts, not only the bytes
    with1, with2 = _hashes(list(range(8)), keys=[(5, img1)]), _hashes(list(range(8)), keys=[(5, img2)])
    assert with1[0] == with2[0] == a[0] and with1[1] != with2[1]  # media key the block they start in
    grown = _hashes(list(range(8)))
    extend_block_hashes(grown, list(range(12)), 4)  # incremental: only the new full block is added
    assert grown == _hashes(list(range(12)))


# ---- the cache's block pool --------------------------------------------------------------------------
def _cache(num_blocks=6):
    return PagedKVCache(TEXT, num_blocks, block_size=4, dtype=torch.float32, enable_prefix_caching=True)


def test_shared_blocks_live_until_their_last_holder_and_evict_lru():
    cache, ids = _cache(), list(range(10))
    hashes = _hashes(ids)
    cache.step(["a"], [10])
    cache.commit("a", hashes)
    assert cache.num_cached_blocks == 2 and cache.num_free_blocks == 3
    hit = cache.find_cached(hashes, 10)
    assert hit == cache._blocks["a"][:2]
    assert cache.find_cached(hashes, 8) == hit[:1]  # one token is always left to compute
    assert cache.blocks_needed("b", 2, hit) == 1  # 10 tokens: the 2 shared blocks and 1 new
    cache.share("b", hit, 10)
    assert cache.seq_len("b") == 8 and cache.num_free_blocks == 3  # held blocks cost nothing
    cache.free("a")  # "a" aborts: "b" still holds the shared blocks
    assert all(cache._refs[b] == 1 for b in hit) and not set(hit) & set(cache._free)
    assert cache.num_free_blocks == 4
    cache.free("b")  # now unreferenced, but still cached and findable
    assert cache.num_free_blocks == 6 and cache.find_cached(hashes, 10) == hit
    assert cache.blocks_needed("c", 2, hit) == 3  # taking them back uses free blocks
    # the never-cached blocks go first; the cached ones last, the later block of a sequence before the earlier
    cache.step(["d"], [4 * 5])
    assert cache._blocks["d"][-1] == hit[1] and cache.num_cached_blocks == 1
    assert cache.find_cached(hashes, 10) == hit[:1]  # the prefix's first block is still there


def test_a_duplicate_block_stays_private_and_disabled_caching_finds_nothing():
    cache, hashes = _cache(), _hashes(list(range(8)))
    cache.step(["a", "b"], [8, 8])  # the same prefix computed twice in one step
    cache.commit("a", hashes)
    cache.commit("b", hashes)
    assert cache.num_cached_blocks == 2 and cache.find_cached(hashes, 9) == cache._blocks["a"]
    cache.free("b")
    assert cache.find_cached(hashes, 9) == cache._blocks["a"]
    off = PagedKVCache(TEXT, 6, block_size=4, dtype=torch.float32)
    off.step(["a"], [8])
    off.commit("a", hashes)
    assert off.find_cached(hashes, 9) == [] and off.num_cached_blocks == 0


# ---- the engine ------------------------------------------------------------------------------------------
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=320)


def _engine(prefix_caching, **kw):
    kw.setdefault("block_size", 16)
    return Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32,
                              scheduler=kw.pop("scheduler", SCHED), enable_prefix_caching=prefix_caching, **kw)


def _same(got, want):
    assert_same_greedy([o.logprobs for o in got], [o.logprobs for o in want], NEAR_TIE)
    for g, w in zip(got, want):
        for a, b in zip(g.logprobs, w.logprobs):
            if a["token_id"] != b["token_id"]:
                break
            assert abs(a["logprob"] - b["logprob"]) <= LOGPROB_TOL, (a, b)


@pytest.fixture(scope="module")
def image():
    pytest.importorskip("PIL")
    from autoglm_fast.demo import demo_image
    return demo_image(48)


@requires_kernels
@pytest.mark.parametrize("with_image", [True], ids=["text+image"])  # text alone: the eviction test below
def test_second_request_starts_on_the_cached_prefix_and_answers_the_same(with_image, request):
    media = {"images": [request.getfixturevalue("image")]} if with_image else {}
    first, second = PREFIX_TEXT + " what?", PREFIX_TEXT + " why"  # media go before the text
    on = _engine(True)
    a = on.generate([first], GREEDY, **media)[0]
    b = on.generate([second], GREEDY, **media)[0]
    alone = _engine(False).generate([second], GREEDY, **media)[0]
    assert a.cached_tokens == 0 and b.cached_tokens >= 160 and alone.cached_tokens == 0
    _same([b], [alone])
    assert on.cache.prefix_hits == b.cached_tokens
    if with_image:  # another picture: the placeholders are the same tokens, the blocks are not
        rid = on.add_request(second, GREEDY, images=[_other_image()])
        req = on.requests[rid]
        assert on.cache.find_cached(req.block_hashes, req.total_len) == []
        on.abort(rid)


@requires_kernels
def test_glm4v_shares_the_text_before_a_new_screenshot():
    """GLM-4.1V is causal: a new image keys the blocks from its first placeholder on, so an agent's
    system prompt and history before this step's screenshot stay cached; the same image shares through."""
    pytest.importorskip("PIL")
    from autoglm_fast.demo import demo_image

    def engine(prefix_caching):
        return Engine.from_preset("glm4v-tiny", seed=0, backend="fast", dtype=torch.float32, block_size=16,
                                  scheduler=SCHED, enable_prefix_caching=prefix_caching)

    on = engine(True)
    c, proc = on.config, on.runtime.processor
    shots = [demo_image(56), demo_image(56).rotate(90)]  # same size and grid, other pixels
    n = proc.num_image_tokens(proc.preprocess(shots[:1])[1][0])

    def prompt(tail):
        return [p % 250 for p in PREFIX] + [c.image_start_token_id] + [c.image_token_id] * n + [
            c.image_end_token_id] + tail

    a = on.generate([prompt([5, 6])], GREEDY, images=shots[:1])[0]
    b = on.generate([prompt([7])], GREEDY, images=shots[1:])[0]
    same = on.generate([prompt([8])], GREEDY, images=shots[1:])[0]
    alone = engine(False).generate([prompt([7])], GREEDY, images=shots[1:])[0]
    assert a.cached_tokens == 0 and b.cached_tokens == 192  # the 12 full blocks before the image
    assert same.cached_tokens == 16 * ((len(PREFIX) + n + 2) // 16)
    _same([b], [alone])


def _other_image():
    from autoglm_fast.demo import demo_image
    return demo_image(64)


@requires_kernels
def test_eviction_preemption_and_aborts_keep_outputs_identical():
    """Too few blocks for four requests sharing a prefix: cached blocks are evicted and requests preempted
    while others hold shared blocks; an aborted request frees nothing the others still read."""
    prefix = PREFIX[:16]
    prompts = [prefix + [60 + i] * (2 + 2 * i) for i in range(4)]
    params = SamplingParams.greedy(max_tokens=8, ignore_eos=True, logprobs=2)
    tight = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=128)
    # the graph path too: shared blocks reach the device block tables by diffs, and preempted rows come back
    engine = _engine(True, scheduler=tight, num_blocks=13, block_size=4, cuda_graphs=True)  # 12 + the null block
    results = {}

    def step():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.logprobs or [])

    ids = [engine.add_request(p, params) for p in prompts[:2]]
    step()
    step()
    victim = engine.add_request(prompts[0] + [99], params)  # shares the prefix, then aborts mid-run
    step()
    shared = engine.cache._blocks[victim][:len(prefix) // 4]
    assert engine.requests[victim].num_cached_tokens == len(prefix)
    engine.abort(victim)
    assert all(engine.cache._refs[b] >= 1 for b in shared)  # still read by the first two
    ids += [engine.add_request(p, params) for p in prompts[2:]]
    while engine.has_unfinished():
        step()
    assert engine.scheduler.num_preemptions > 0 and engine.cache.evictions > 0
    assert engine.cache.num_free_blocks == engine.cache.capacity
    off = _engine(False, scheduler=tight)
    want = [o.logprobs for o in off.generate(prompts, params)]
    assert_same_greedy([results[i] for i in ids], want, NEAR_TIE)



def test_reference_backend_cannot_share():
    with pytest.raises(ValueError, match="enable_prefix_caching needs the fast backend"):
        Engine.from_preset("nano", backend="reference", enable_prefix_caching=True)
    assert not Engine.from_preset("nano", backend="reference").cache.prefix_caching
