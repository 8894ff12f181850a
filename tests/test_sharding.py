"""Tensor-parallel sharding in one process (no collectives): what each rank holds, that the ranks' parts
make up the whole model exactly, per-rank memory, and that loading reads only a rank's slices."""
import dataclasses

import pytest
import torch

from autoglm_fast.config import TextConfig
from autoglm_fast.families import family_for_preset
from autoglm_fast.parallel.sharding import Shard, TensorParallel, build_sharded, decoder, local_text_config
from autoglm_fast.weights import load_pretrained

NANO = family_for_preset("nano")


def _ranks(preset, size=2, **kw):
    fam = family_for_preset(preset)
    return [fam.model_cls.from_config(fam.preset(preset), seed=3, tensor_parallel=TensorParallel(r, size), **kw)
            for r in range(size)]


def _whole(preset):
    fam = family_for_preset(preset)
    return fam.model_cls.from_config(fam.preset(preset), seed=3)


@pytest.mark.parametrize("preset", ["nano", "glm4v-tiny"])
def test_ranks_parts_make_up_the_whole_model_exactly(preset):
    """Column and row splits, gate_up's two row ranges, KV heads and the vocabulary: concatenating the ranks'
    tensors along their Shard's dim gives the TP=1 model's tensors bit for bit (same seed: the same draws)."""
    whole, ranks = _whole(preset), _ranks(preset)
    fam = family_for_preset(preset)
    plans = [build_sharded(fam.model_cls, fam.preset(preset), m.tensor_parallel)[1] for m in ranks]
    full = whole.state_dict()
    split = 0
    for name, tensor in full.items():
        parts = [m.state_dict()[name] for m in ranks]
        shard = plans[0].get(name)
        if shard is None:  # replicated
            assert all(torch.equal(p, tensor) for p in parts), name
            continue
        split += 1
        rebuilt = torch.zeros_like(tensor)
        for p, plan in zip(parts, plans):
            index, offset = [slice(None)] * tensor.dim(), 0
            for s, e in plan[name].ranges:
                index[shard.dim] = slice(s, e)
                rebuilt[tuple(index)] = p.narrow(shard.dim, offset, e - s)
                offset += e - s
            assert offset == p.shape[shard.dim], name
        assert torch.equal(rebuilt, tensor), name
    text = fam.preset(preset).text
    # per layer q, k, v (+ biases), o, gate_up, down; then embed_tokens and lm_head
    assert split == text.num_hidden_layers * (9 if text.attention_bias else 6) + 2


def test_gate_up_rows_are_gate_then_up_of_the_same_columns():
    """gate_up_proj is [gate; up]: a rank's rows are its gate rows and the matching up rows (SwiGLU pairs
    gate column j with up column j), not one contiguous half."""
    whole, (r0, r1) = _whole("nano"), _ranks("nano")
    I = NANO.preset("nano").text.intermediate_size
    w = whole.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(r1.model.layers[0].mlp.gate_up_proj.weight, torch.cat([w[I // 2:I], w[I + I // 2:]]))
    assert torch.equal(r0.model.layers[0].mlp.down_proj.weight, whole.model.layers[0].mlp.down_proj.weight[:, :I // 2])


def test_local_config_and_kv_heads_replicated_past_their_count():
    text = TextConfig(vocab_size=103, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    local = local_text_config(text, TensorParallel(3, 4))
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (2, 1, 24)
    # query heads 6, 7 of rank 3 read KV head 1 (group size 4): rank 3 holds KV head 1, as rank 2 does
    assert [TensorParallel(r, 4).kv_heads(2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [TensorParallel(r, 2).kv_heads(2) for r in range(2)] == [(0, 1), (1, 1)]
    # a vocabulary that does not divide: ceil shares, the last rank short
    assert [TensorParallel(r, 4).vocab(103) for r in range(4)] == [(0, 26), (26, 52), (52, 78), (78, 103)]
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tensor_parallel_size=3"):
        local_text_config(text, TensorParallel(0, 3))
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads=2"):
        TensorParallel(0, 3).kv_heads(2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        TensorParallel(0, 0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        TensorParallel(2, 2)


def test_shard_reads_only_its_ranges():
    full = torch.arange(24.0).reshape(4, 6)
    assert torch.equal(Shard(1, ((1, 3), (4, 5)), 6).take(full), full[:, [1, 2, 4]])
    assert Shard(0, ((2, 4),), 4).local_shape((4, 6)) == (2, 6)
    assert Shard(0, ((2, 4),), 4).full_shape((2, 6)) == (4, 6)


def _decoder_numel(model, norms: bool = False) -> int:
    """Parameters of the GLM decoder and lm_head (the part tensor parallelism splits), or of its norms alone
    (which every rank keeps)."""
    params = dict(decoder(model).named_parameters())
    params["lm_head"] = model.lm_head.weight
    seen = {id(p): p for n, p in params.items() if ("norm" in n) == norms}  # a tied lm_head once
    return sum(p.numel() for p in seen.values())


@pytest.mark.parametrize("preset", ["nano", "glm4v-tiny"])
def test_each_rank_holds_half_the_decoder(preset):
    whole, ranks = _whole(preset), _ranks(preset)
    for m in ranks:
        assert _decoder_numel(m) == _decoder_numel(whole) // 2
        assert _decoder_numel(m, norms=True) == _decoder_numel(whole, norms=True)


@pytest.mark.parametrize("preset, most", [("autoglm-phone-9b", 0.53), ("glm-4.1v-9b", 0.55)])
def test_real_presets_per_rank_bytes_about_half(preset, most):
    """The 9B presets on the meta device (nothing allocated): a rank's parameters are about half of the
    model's, the replicated encoders the rest."""
    fam = family_for_preset(preset)
    with torch.device("meta"):
        whole = sum(p.numel() for p in fam.model_cls(fam.preset(preset)).parameters())
    for rank in range(2):
        model, _ = build_sharded(fam.model_cls, fam.preset(preset), TensorParallel(rank, 2))
        assert 0.5 < sum(p.numel() for p in model.parameters()) / whole < most


class _CountingOpen:
    """safetensors.safe_open, counting the bytes of every tensor (or slice of one) taken from the files."""

    def __init__(self, real):
        self.real, self.bytes = real, 0

    def __call__(self, *args, **kwargs):
        counter, handle = self, self.real(*args, **kwargs)

        class Slice:
            def __init__(self, s):
                self.s = s

            def __getitem__(self, index):
                t = self.s[index]
                counter.bytes += t.numel() * t.element_size()
                return t

            def get_shape(self):
                return self.s.get_shape()

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_slice(self, name):
                return Slice(handle.get_slice(name))

            def get_tensor(self, name):
                t = handle.get_tensor(name)
                counter.bytes += t.numel() * t.element_size()
                return t

        return Handle()


def _state_bytes(model) -> int:
    seen, n = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def test_a_rank_reads_only_its_shards(tmp_path, monkeypatch):
    """Each rank of a saved nano checkpoint reads exactly its own tensors' bytes from the files (the split
    ones in part, via get_slice), about half of the decoder's, and ends with the whole model's slices."""
    import autoglm_fast.weights as weights
    _whole("nano").save_pretrained(tmp_path)
    counting = _CountingOpen(weights.safe_open)
    monkeypatch.setattr(weights, "safe_open", counting)
    whole = load_pretrained(NANO.model_cls, tmp_path)
    whole_bytes, counting.bytes = counting.bytes, 0
    assert whole_bytes == _state_bytes(whole)
    for rank, ref in enumerate(_ranks("nano")):
        model = load_pretrained(NANO.model_cls, tmp_path, tensor_parallel=TensorParallel(rank, 2))
        read, counting.bytes = counting.bytes, 0
        assert read == _state_bytes(model)  # its own bytes, no more
        split = _decoder_numel(whole) * 4
        assert read - (whole_bytes - split) == split // 2  # of the split part, half; the rest all
        for name, t in model.state_dict().items():
            assert torch.equal(t, ref.state_dict()[name]), name


def test_glm41v_checkpoint_ranks_read_their_slices(tmp_path, monkeypatch):
    """The transformers-saved GLM-4.1V directory (GLM's real 151552-token vocabulary, HF names): each rank
    reads about half of the decoder and embedding bytes."""
    pytest.importorskip("transformers")
    from glm4v_checkpoint import save_checkpoint

    import autoglm_fast.weights as weights
    from autoglm_fast.families.glm4v.model import Glm4vForConditionalGeneration as Glm4v
    save_checkpoint(tmp_path, "{{ messages }}")
    counting = _CountingOpen(weights.safe_open)
    monkeypatch.setattr(weights, "safe_open", counting)
    whole = Glm4v.from_pretrained(tmp_path)
    whole_bytes, counting.bytes = counting.bytes, 0
    vision = sum(p.numel() * 4 for p in whole.model.visual.parameters())
    for rank in range(2):
        model = Glm4v.from_pretrained(tmp_path, tensor_parallel=TensorParallel(rank, 2))
        read, counting.bytes = counting.bytes, 0
        assert read == _state_bytes(model)
        assert 0.49 < (read - vision) / (whole_bytes - vision) < 0.51
        assert model.model.language_model.embed_tokens.weight.shape[0] == 151552 // 2


def test_sizes_that_do_not_split_fail_before_any_process_starts(monkeypatch):
    import subprocess

    from autoglm_fast.engine import Engine
    monkeypatch.setattr(subprocess, "Popen", None)  # starting a worker would fail differently
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tensor_parallel_size=4"):
        Engine.from_preset("nano", tensor_parallel_size=4, backend="reference")
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int, got 0"):
        Engine.from_preset("nano", tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"Engine\(model\) serves the model it is given"):
        Engine(_whole("nano"), tensor_parallel_size=2)


def test_a_rank_refuses_to_save_its_shard_as_a_checkpoint(tmp_path):
    (rank0, _) = _ranks("nano")
    with pytest.raises(ValueError, match="one tensor-parallel rank's shard"):
        rank0.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())


def _dequantized(model) -> dict:
    from autoglm_fast.quant.linear import QuantLinear
    return {n: m.dequantize().float() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _assert_rank_slices(whole: dict, ranks: list[dict], plans: list[dict]) -> None:
    """Each rank's dequantized layer is exactly its Shard of the whole model's."""
    assert whole and all(r.keys() == whole.keys() for r in ranks)
    for name, w in whole.items():
        for got, plan in zip(ranks, plans):
            shard = plan.get(f"{name}.weight")
            assert torch.equal(got[name], w if shard is None else shard.take(w)), name


def test_awq_checkpoint_shards_in_whole_groups(tmp_path):
    """An AWQ checkpoint (groups of 32) at TP=2: the packed qweight / qzeros / scales are sliced as they
    are (int32 words of 8 output rows, groups of input columns), so each rank dequantizes to exactly its
    slice. The tiny MLP's 96 columns are 3 groups: ranks get 2 and 1 (whole groups, unevenly)."""
    pytest.importorskip("transformers")
    from glm4v_checkpoint import save_checkpoint
    from test_awq import write_awq_checkpoint

    from autoglm_fast.families.glm4v.config import Glm4vConfig
    from autoglm_fast.families.glm4v.model import Glm4vForConditionalGeneration as Glm4v
    save_checkpoint(tmp_path / "fp", "{{ messages }}")
    write_awq_checkpoint(tmp_path / "fp", tmp_path / "awq", group_size=32)
    config = Glm4vConfig.load(tmp_path / "awq")
    tps = [TensorParallel(r, 2) for r in range(2)]
    ranks = [Glm4v.from_pretrained(tmp_path / "awq", tensor_parallel=tp) for tp in tps]
    assert [m.config.text.intermediate_size for m in ranks] == [64, 32]
    _assert_rank_slices(_dequantized(Glm4v.from_pretrained(tmp_path / "awq")), [_dequantized(m) for m in ranks],
                        [build_sharded(Glm4v, config, tp, align=32)[1] for tp in tps])


def test_int4_at_load_quantizes_the_groups_one_device_would():
    """int4 round to nearest on each rank's slice, after an MLP split in whole groups: every layer's codes
    and scales are those of TP=1 (int8's per-channel scales of row-parallel layers are not: a rank sees
    only its columns)."""
    from autoglm_fast.quant.quantize import QuantConfig
    int4 = QuantConfig("int4", group_size=32)
    text = NANO.preset("nano").text
    text = dataclasses.replace(text, num_attention_heads=4, head_dim=16, intermediate_size=160)  # o_proj: 2 x 32
    config = dataclasses.replace(NANO.preset("nano"), text=text)
    whole = NANO.model_cls.from_config(config, seed=1, quantization=int4)
    tps = [TensorParallel(r, 2) for r in range(2)]
    ranks = [NANO.model_cls.from_config(config, seed=1, quantization=int4, tensor_parallel=tp) for tp in tps]
    assert [m.config.text.intermediate_size for m in ranks] == [96, 64]  # 5 groups of 32: 3 + 2
    plans = [build_sharded(NANO.model_cls, config, tp, align=32)[1] for tp in tps]
    dequantized = _dequantized(whole)
    _assert_rank_slices({n: w for n, w in dequantized.items() if "lm_head" not in n},  # int8: per rank's rows
                        [{n: w for n, w in _dequantized(m).items() if "lm_head" not in n} for m in ranks], plans)


@pytest.mark.parametrize("preset", ["autoglm-phone-9b", "glm-4.1v-9b"])
def test_info_prints_per_gpu_sizes_of_n_ranks(preset, capsys):
    import json

    from autoglm_fast.cli import main
    sizes = []
    for argv in ([], ["-tp", "2"]):
        assert main(["info", "--preset", preset, *argv]) == 0
        sizes.append(json.loads(capsys.readouterr().out))
    one, two = sizes
    assert two["tensor_parallel_size"] == 2 and "tensor_parallel_size" not in one
    assert two["memory"]["kv_bytes_per_token"] * 2 == one["memory"]["kv_bytes_per_token"]  # one KV head of two
    assert 0.5 < two["memory"]["weight_bytes"]["total"] / one["memory"]["weight_bytes"]["total"] < 0.55
    assert two["memory"]["kv_tokens_per_card"]["24 GiB"] > 2 * one["memory"]["kv_tokens_per_card"]["24 GiB"]


def test_four_ranks_replicating_kv_heads_compute_the_whole_model(monkeypatch):
    """TP=4 with 2 KV heads (each held by two ranks) and a vocabulary of 303 (shares 76, 76, 76, 75), run as
    four threads whose collectives are summed in rank order: the ranks' logits, concatenated, are the whole
    model's (fp32 rounding: the row-parallel sums add in another order)."""
    import threading

    from agreement import assert_close_across_shapes
    text = TextConfig(vocab_size=303, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    config = dataclasses.replace(NANO.preset("nano"), text=text)
    whole = NANO.model_cls.from_config(config, seed=5)
    ranks = [NANO.model_cls.from_config(config, seed=5, tensor_parallel=TensorParallel(r, 4)) for r in range(4)]
    assert [m.config.text.num_key_value_heads for m in ranks] == [1, 1, 1, 1]
    assert [m.lm_head.weight.shape[0] for m in ranks] == [76, 76, 76, 75]
    barrier, slots, local = threading.Barrier(4), [None] * 4, threading.local()

    def all_reduce(x, group=None):
        slots[local.rank] = x.clone()
        barrier.wait()
        total = sum(slots[1:], slots[0].clone())  # every rank adds in the same order
        barrier.wait()
        x.copy_(total)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    ids = torch.tensor([[5, 299, 76, 77, 151, 302, 0, 228]])
    positions = torch.arange(ids.shape[1])[None]

    def logits(model):
        gm = decoder(model)
        return model.lm_head(gm(gm.embed_tokens(ids), positions))

    out = [None] * 4

    def run(rank):
        local.rank = rank
        with torch.no_grad():
            out[rank] = logits(ranks[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    with torch.no_grad():
        want = logits(whole)
    got = torch.cat(out, -1)
    assert_close_across_shapes(got, want)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
