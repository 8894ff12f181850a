"""Tensor parallelism run for real: two CPU processes over gloo (rank 0 is the test process, rank 1 a
spawned worker), against the same engine on one process. Greedy tokens must agree for a mixed batch
(text, image, audio) with requests joining, aborted and chunk-prefilled mid-run, for both families, an AWQ
checkpoint too; the fast backend runs its kernels in Triton's interpreter, and a sampled request there
must have been computed on rank 0's tokens. A worker that dies, or a step that fails on rank 0, must
surface as an error (the server exits naming the rank); the CLI prints the same text with two ranks."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from agreement import assert_same_greedy
from autoglm_fast.demo import demo_image, demo_tone
from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from autoglm_fast.kernels.utils import device_supported
from autoglm_fast.parallel.launch import WorkerDiedError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

GREEDY = SamplingParams.greedy(max_tokens=4, ignore_eos=True, logprobs=2)
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)  # chunked prefill
GAP = 1e-4  # fp32: two ranks' partial sums differ from one GEMM by rounding only


def _fast_or_skip(backend):
    if backend == "fast" and not device_supported(torch.device("cpu")):
        pytest.skip("the kernels need CUDA, or TRITON_INTERPRET=1 on a CPU")


def _drive(engine, requests, late, params=GREEDY):
    """Run `requests` (`params` unless one brings its own), add `late` after two steps and abort a throwaway
    request after one: every kind of command a worker must follow. Returns each kept request's per-token
    logprob records."""
    ids = [engine.add_request(**{"params": params, **r}) for r in requests]
    doomed = engine.add_request("to be aborted", GREEDY)
    got, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.logprobs or [])
        steps += 1
        if steps == 1:
            engine.abort(doomed)
        if steps == 2:
            ids += [engine.add_request(**{"params": params, **r}) for r in late]
    return [got[i] for i in ids]


def _compare(make, requests, late, backend):
    """make(tp, backend) -> an engine. TP=2 on `backend` against one process on the reference backend (the
    fast backend equals it to the same rounding on one process: test_engine.py, test_glm4v_engine.py)."""
    params = GREEDY if backend == "reference" else SamplingParams.greedy(max_tokens=3, ignore_eos=True, logprobs=2)
    one = make(1, "reference")
    want = _drive(one, requests, late, params)
    two = make(2, backend)
    try:
        assert two.parallel.size == 2 and two.driver is not None
        got = _drive(two, requests, late, params)
        # rank 0 holds half of the decoder: its KV head, its columns, its vocabulary rows
        assert two.config.text.num_key_value_heads * 2 == one.config.text.num_key_value_heads
        assert two.runtime.embed_tokens.weight.shape[0] * 2 == one.runtime.embed_tokens.weight.shape[0]
    finally:
        two.close()
    assert [len(g) for g in got] == [params.max_tokens] * len(got)
    greedy = [i for i, r in enumerate(requests + late) if "params" not in r]
    assert_same_greedy([got[i] for i in greedy], [want[i] for i in greedy], GAP)
    return one, two, got


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_nano_tp2_equals_one_process(backend):
    """Text, an image, audio, both; the fast backend decodes through the CUDA-graph static buffers (eagerly
    on a CPU), whose last tokens a worker takes from rank 0 (its own sampling is never used)."""
    _fast_or_skip(backend)
    pytest.importorskip("PIL")
    from autoglm_fast.families import family_for_preset
    tone = demo_tone(family_for_preset("nano").preset("nano"), seconds=0.5)
    requests = [dict(prompt="What is on the screen?"), dict(prompt="Both?", images=[demo_image(64)], audio=[tone])]
    late = [dict(prompt="Describe it.", images=[demo_image(48)]), dict(prompt="What do you hear?", audio=[tone])]
    graphs = backend == "fast"
    if graphs:  # the interpreter is slow (a program per token and head): fewer, shorter prompts, and one
        # unseeded sampled request: the worker's random draws differ from rank 0's, whose tokens it must take
        requests, late = [dict(prompt="Tap OK"), requests[1], dict(prompt="Go", params=SAMPLED)], []
    make = lambda tp, backend: Engine.from_preset("nano", seed=0, backend=backend, scheduler=SCHED,  # noqa: E731
                                                  cuda_graphs=backend == "fast", device="cpu", dtype=torch.float32,
                                                  tensor_parallel_size=tp)
    one, _, got = _compare(make, requests, late, backend)
    if graphs:  # the sampled tokens' logprobs are those of one process fed the same tokens
        _assert_teacher_forced(one, one.tokenizer.encode("Go"), got[2])


SAMPLED = SamplingParams(temperature=1.0, top_k=5, max_tokens=3, ignore_eos=True, logprobs=0)


def _assert_teacher_forced(engine, prompt: list[int], records: list[dict]) -> None:
    """Each record's token scored `logprob` after the prompt and the tokens before it (a rank that had
    attended over other tokens would score them otherwise)."""
    tokens = [r["token_id"] for r in records]
    for k, record in enumerate(records):
        (out,) = engine.generate([prompt + tokens[:k]], SamplingParams.greedy(max_tokens=1, logprobs=20))
        top = dict(out.logprobs[0]["top"])
        assert abs(top[record["token_id"]] - record["logprob"]) < 1e-4, (k, record, top.get(record["token_id"]))


@pytest.mark.parametrize("backend, awq", [("reference", False), ("fast", False), ("reference", True)],
                         ids=["reference", "fast", "reference, AWQ checkpoint"])
def test_glm41v_checkpoint_tp2_equals_one_process(tmp_path_factory, backend, awq):
    """The tiny GLM-4.1V as transformers saves it (GLM's 151552-token vocabulary, split in two), each rank
    reading its slices: text and image requests, M-RoPE positions, the replicated vision tower. As an AWQ
    checkpoint (groups of 32) its packed layers shard too, the MLP in whole groups (2 and 1 of 3)."""
    _fast_or_skip(backend)
    pytest.importorskip("transformers")
    from glm4v_checkpoint import save_checkpoint
    from test_awq import write_awq_checkpoint
    from test_glm4v_engine import _images, _prompt
    directory = tmp_path_factory.mktemp("glm41v_tp")
    save_checkpoint(directory / "fp", "{{ messages }}")
    if awq:
        write_awq_checkpoint(directory / "fp", directory / "awq", group_size=32)
    directory /= "awq" if awq else "fp"
    imgs = [_images((112, 84)), _images((84, 112), (56, 56))]
    requests = [dict(prompt=_prompt(directory, [])), dict(prompt=_prompt(directory, imgs[0]), images=imgs[0])]
    late = [dict(prompt=_prompt(directory, imgs[1]), images=imgs[1])] if backend == "reference" and not awq else []
    one, two, _ = _compare(lambda tp, backend: Engine.from_pretrained(
        directory, backend=backend, device="cpu", dtype=torch.float32, scheduler=SCHED,
        cuda_graphs=backend == "fast", tensor_parallel_size=tp), requests, late, backend)
    if awq:
        assert two.config.text.intermediate_size == 64  # rank 0: 2 of the 3 groups


def test_dead_worker_is_an_error_naming_its_rank():
    engine = Engine.from_preset("nano", seed=0, backend="reference", device="cpu", tensor_parallel_size=2)
    try:
        worker = engine.driver.workers[0]
        assert engine.generate(["hi"], SamplingParams.greedy(max_tokens=2))[0].completion_tokens == 2
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=30)
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) died \(killed by SIGKILL\)"):
            engine.generate(["hi"], SamplingParams.greedy(max_tokens=2))
    finally:
        engine.close()


def test_generate_cli_prints_the_same_text_with_two_ranks():
    argv = [sys.executable, "-m", "autoglm_fast", "generate", "--preset", "nano", "--backend", "reference",
            "--device", "cpu", "--prompt", "Open the settings app", "--temperature", "0", "--max-tokens", "8"]
    runs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # side by side
            for a in (argv, argv + ["--tensor-parallel-size", "2"])]
    (out1, err1), (out2, err2) = (p.communicate(timeout=300) for p in runs)
    assert [p.returncode for p in runs] == [0, 0], err1[-2000:] + err2[-2000:]
    assert out2 == out1 and out1.strip()
    assert "x 2 ranks" in err2 and "tensor-parallel worker rank 1: pid" in err2


def test_serve_exits_naming_the_rank_when_a_worker_is_killed():
    """The server cannot go on without a rank: it exits with status 1 within 30 s, saying which one died."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from live_server import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoglm_fast", "serve", "--preset", "nano", "--backend",
                             "reference", "--device", "cpu", "-tp", "2", "--port", str(port), "--host", "127.0.0.1",
                             "--max-model-len", "256"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        pid = int(next(l for l in lines if "tensor-parallel worker rank 1: pid" in l).split()[-1])
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code = proc.wait(timeout=30)
        reader.join(timeout=5)
        assert code != 0 and time.monotonic() - killed < 30
        assert f"tensor-parallel worker rank 1 (pid {pid}) died (killed by SIGKILL)" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.gpu
def test_two_gpus_nccl_with_graphs_per_rank_agree_with_one():
    """Two GPUs (NCCL): fp16 decode steps replayed from CUDA graphs captured on each rank, collectives
    inside; greedy tokens agree with one GPU's up to near ties (fp16 rounding)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    make = lambda tp: Engine.from_preset("nano", seed=0, backend="fast", scheduler=SCHED, device="cuda",  # noqa: E731
                                         dtype=torch.float16, tensor_parallel_size=tp)
    params = SamplingParams.greedy(max_tokens=8, ignore_eos=True, logprobs=2)
    requests = [dict(prompt="Tap OK"), dict(prompt="Open the settings app and find Wi-Fi")]
    want = _drive(make(1), requests, [], params)
    two = make(2)
    try:
        got = _drive(two, requests, [], params)
        assert two.graph_state.status == "captured"
    finally:
        two.close()
    assert_same_greedy(got, want, 2e-2)


def test_a_failed_step_on_rank_0_stops_the_workers_and_the_engine():
    """After rank 0 sent a plan, a failure of its own leaves the workers mid-step: they are stopped, and the
    engine refuses further steps with the reason (instead of pairing the wrong collectives)."""
    engine = Engine.from_preset("nano", seed=0, backend="reference", device="cpu", tensor_parallel_size=2)
    try:
        def boom(*args):
            raise RuntimeError("injected")
        engine.runner.run = boom
        engine.add_request("hi", SamplingParams.greedy(max_tokens=2))
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
        assert engine.driver.workers[0].process.wait(timeout=30) is not None
        with pytest.raises(RuntimeError, match=r"a step failed on rank 0 \(RuntimeError: injected\); the "
                                                "tensor-parallel workers were stopped"):
            engine.step()
    finally:
        engine.close()
