"""The prefill attention's offline-tuned config table (kernels/tuned/paged_prefill.json): what ships is valid
for every target, the launcher launches what the table says for a (GPU, q bucket, head_dim), and
`autoglm-fast bench --tune` (benchmarks/tune.py) writes a table the launcher reads — or, without CUDA, fails
with a clear message. None of this needs a GPU."""
import json

import pytest
import torch
import triton

from autoglm_fast import cli
from autoglm_fast.benchmarks import tune
from autoglm_fast.kernels import paged_attention as pa
from autoglm_fast.kernels.utils import TARGETS, config_name, gpu_target, tuned_table
from kernel_harness import DEVICE, assert_matches, requires_kernels
from paged_helpers import SMALL, cache_args, chunk_step, make_cache, queries


def test_shipped_table_covers_every_target_and_bucket_with_configs_offered_there():
    table = tuned_table("paged_prefill")
    for target in TARGETS:
        entry = table[target]
        assert entry["source"]  # "default: ..." (a guess) or "measured: <GPU> ..."
        assert set(entry[str(pa.SPEC_HEAD_DIM)]) == {str(b) for b in tune.BUCKETS}
        for bucket, name in entry[str(pa.SPEC_HEAD_DIM)].items():
            assert name in pa.PREFILL_BY_NAME, (target, bucket, name)
            assert target in pa.PREFILL_TARGETS[name], f"{name} does not fit {target} (q bucket {bucket})"


def test_compile_specs_list_every_config_on_exactly_its_targets():
    """The compile matrix checks shared memory and spills per spec, so each config a target can pick must be
    there with that target (and a config is not compiled for a target it is not offered on)."""
    specs = pa.compile_specs()
    for dtype in ("fp16", "bf16"):
        got = {s.label.removeprefix(f"{dtype} "): s.targets for s in specs if s.label.startswith(dtype)}
        assert got == pa.PREFILL_TARGETS
    assert pa.PREFILL_TARGETS["128x128 w8 s3"] == ("sm_90",)


def test_config_names_and_gpu_targets():
    assert config_name(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)) == "128x64 w8 s2"
    assert [gpu_target(c) for c in [(9, 0), (8, 0), (8, 7), (8, 9), (8, 6), (12, 0)]] == \
        ["sm_90", "sm_80", "sm_80", "sm_89", "sm_89", "sm_89"]
    assert [pa.prefill_q_bucket(n) for n in (1, 3, 300, 4096, 10_000)] == [1, 4, 512, 4096, 4096]


def test_choice_follows_the_table_then_the_defaults():
    table = {"sm_90": {"128": {"256": "128x32 w8 s3"}}, "sm_80": {"128": {"256": "128x128 w8 s3"}}}
    assert pa.choose_prefill_config("sm_90", 256, 128, table) is pa.PREFILL_BY_NAME["128x32 w8 s3"]
    # no entry: the defaults (guesses) — small tiles for short chunks, the biggest that fits for long ones
    assert config_name(pa.choose_prefill_config("sm_90", 4096, 128, table)) == "128x128 w8 s3"
    assert config_name(pa.choose_prefill_config("sm_89", 4096, 128, table)) == "128x64 w8 s2"
    assert config_name(pa.choose_prefill_config("sm_90", 16, 128, table)) == "32x64 w4 s3"
    assert pa.choose_prefill_config("sm_90", 256, 64, table) is pa.choose_prefill_config("sm_90", 256, 64, {})
    assert pa.choose_prefill_config("sm_90", 4096, 256, table) is pa.PREFILL_CONFIGS[0]
    with pytest.raises(ValueError, match="'128x128 w8 s3' .* is not a prefill config for sm_80"):
        pa.choose_prefill_config("sm_80", 256, 128, table)  # a config that does not fit sm_80
    for target in TARGETS:  # every default is offered where it is chosen
        for bucket in tune.BUCKETS:
            for head_dim in (64, 128, 256):
                pa.choose_prefill_config(target, bucket, head_dim, {})


class _Recorder:
    """Stands in for the @triton.jit kernel: records the launch instead of running it."""
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grid, self.kwargs = grid, kwargs
        return launch


@requires_kernels
def test_launcher_launches_the_tables_config_for_the_gpu(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(pa.paged_prefill_kernel, "fn", recorder)
    monkeypatch.setattr(pa.paged_prefill_kernel, "configs", pa.PREFILL_CONFIGS)  # as on a GPU: the table decides
    monkeypatch.setattr(pa, "device_target", lambda index: "sm_90")
    monkeypatch.setattr(pa, "tuned_table", lambda name: {"sm_90": {"12": {"512": "128x32 w8 s3"}}})
    cache = make_cache(*SMALL, 16, torch.float32)
    meta = chunk_step(cache, [0, 40], [300, 17])  # max_query_len 300: bucket 512
    pa.paged_prefill_attention(queries(317, *SMALL, torch.float32), *cache_args(cache, meta), meta.max_query_len)
    kw = recorder.kwargs
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == (128, 32, 8, 3)
    assert recorder.grid == (SMALL[0], 3, 2)  # heads fastest, cdiv(300, 128) query blocks, sequences


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_tune_without_cuda_fails_with_a_clear_message(capsys):
    assert cli.main(["bench", "--tune"]) == 2
    err = capsys.readouterr().err
    assert "--tune needs a CUDA GPU" in err and "Traceback" not in err


def test_tune_writes_a_table_the_launcher_reads(tmp_path):
    path = tmp_path / "paged_prefill.json"
    path.write_text(json.dumps({"sm_80": {"source": "kept", "128": {"1": "64x32 w4 s2"}}}))
    picks = {b: "128x128 w8 s3" if b >= 1024 else "32x64 w4 s3" for b in tune.BUCKETS}
    tune.write_table(path, "sm_90", picks, "measured: test")
    table = json.loads(path.read_text())
    assert table["sm_80"]["source"] == "kept"  # other targets' entries stay
    assert pa.choose_prefill_config("sm_90", 2048, 128, table) is pa.PREFILL_BY_NAME["128x128 w8 s3"]
    assert pa.choose_prefill_config("sm_90", 2, 128, table) is pa.PREFILL_BY_NAME["32x64 w4 s3"]
    assert tune.causal_tflops(4, 1.0) == 4 * 10 * pa.SPEC_HEAD_DIM * pa.SPEC_HEADS / 1e9


@requires_kernels
def test_tune_times_a_valid_glm_prefill():
    """The case --tune times is a GLM-4-9B launch the launcher accepts and the kernel gets right."""
    q, k_pool, v_pool, tables, seq_lens, qsl, q_len = args = tune.prefill_case(5, torch.float16, DEVICE)
    assert q.shape == (5, pa.SPEC_HEADS, pa.SPEC_HEAD_DIM) and k_pool.shape[1:] == (32, pa.SPEC_KV_HEADS, 128)
    assert_matches(pa.paged_prefill_attention(*args, max_seq_len=q_len), pa.reference_paged_attention,
                   q, k_pool, v_pool, tables, seq_lens, qsl)
