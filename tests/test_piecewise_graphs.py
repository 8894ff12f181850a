"""Prefill and mixed steps through piecewise graphs (engine/piecewise_graphs.py): token rows padded to a
bucket, each layer's pieces before and after attention, attention eager between them. The padded path
(run eagerly without CUDA) gives the eager backbone's hidden states; on CUDA the pieces are captured."""
import pytest
import torch

from agreement import assert_close_across_shapes
from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from autoglm_fast.engine.piecewise_graphs import PiecewiseGraphs
from kernel_harness import requires_kernels

SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=40, max_model_len=128)


@requires_kernels
@torch.inference_mode()
@pytest.mark.parametrize("preset", ["nano", "glm4v-tiny"])
def test_a_padded_mixed_step_equals_the_eager_backbone(preset):
    engine = Engine.from_preset(preset, seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED,
                                cuda_graphs=True)
    rt, cache, pieces = engine.runtime, engine.cache, engine.runner.pieces
    assert isinstance(pieces, PiecewiseGraphs) and pieces.buckets == [16, 32, 40]
    gen = torch.Generator().manual_seed(0)
    cache.append(["a", "b"], [21, 5])  # two sequences with tokens cached
    for counts in ([1, 1, 19], [1, 7]):  # decodes beside a chunk: 21 rows -> bucket 32, then 8 -> 16
        seqs = ["a", "b", "c"][:len(counts)]
        meta = cache.step(seqs, counts)
        n = sum(counts)
        if rt.text.position_rows > 1:  # M-RoPE rows that differ from the positions, as after an image
            meta.rope_positions = torch.stack([meta.positions, meta.positions + 3, meta.positions + 5])
        embeds = torch.randn(n, rt.text.hidden_size, generator=gen)
        caches = cache.layer_caches(meta)
        k_before = [k.clone() for k in cache.k_pools]
        got = pieces.run(meta, embeds)
        k_got = [k.clone() for k in cache.k_pools]
        for k, k0 in zip(cache.k_pools, k_before):  # the eager run writes the same K/V again
            k.copy_(k0)
        rope = None if meta.rope_positions is None else meta.rope_positions[:, None]
        want = rt.backbone(embeds[None], meta.positions[None], caches, rope_positions=rope)[0]
        assert_close_across_shapes(got, want)
        null = cache.null_block
        for k, k_want in zip(k_got, cache.k_pools):  # padding rows wrote into the null block alone
            real = [b for b in range(cache.num_blocks) if b != null]
            assert_close_across_shapes(k[real], k_want[real])
    assert pieces.run(cache.step(["d"], [41]), torch.zeros(41, rt.text.hidden_size)) is None  # past the buckets


@requires_kernels
def test_the_engine_runs_prefill_through_the_pieces(monkeypatch):
    engine = Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED,
                                cuda_graphs=True)
    calls = []
    run = engine.runner.pieces.run
    monkeypatch.setattr(engine.runner.pieces, "run", lambda meta, embeds: calls.append(embeds.shape[0]) or
                        run(meta, embeds))
    (out,) = engine.generate(["a prompt in two chunks, since it is longer than the budget"],
                             SamplingParams.greedy(max_tokens=2, ignore_eos=True))
    assert len(out.token_ids) == 2 and calls == [40, len("a prompt in two chunks, since it is longer than the budget") - 40]


@pytest.mark.gpu
def test_pieces_are_captured_and_replayed_on_cuda():
    engine = Engine.from_preset("nano", seed=0, backend="fast", scheduler=SCHED)
    outs = engine.generate(["one", "a longer second prompt"], SamplingParams.greedy(max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)
    pieces = engine.runner.pieces
    assert pieces.failure is None and pieces.capture and pieces.replays > 0 and pieces.graphs
