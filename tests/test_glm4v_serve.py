"""Acceptance: `autoglm-fast serve --model DIR`, started as Open-AutoGLM starts vLLM, on a GLM-4.1V directory
that transformers saved, answers as transformers' greedy `generate` does: the same tokens, logprobs within
2e-3 and the same prompt length, for text only, a screenshot with a system prompt, and two images; and
Open-AutoGLM's request shape streams to [DONE]."""
import base64
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("PIL")

from glm4v_checkpoint import save_checkpoint  # noqa: E402
from live_server import free_port  # noqa: E402

TEMPLATE = (Path(__file__).parent / "fixtures" / "glm41v_chat_template.jinja").read_text()
PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"
MAX_PIXELS = 200_704  # small screenshots on a CPU; the real agent passes 5,000,000
LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("AutoGLM-Phone-9B-tiny")
    hf = save_checkpoint(directory, TEMPLATE)
    port = free_port()
    cmd = [sys.executable, "-m", "autoglm_fast", "serve", "--model", str(directory), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "autoglm-phone-9b", "--max-model-len", "512",
           "--limit-mm-per-prompt", '{"image":10}', "--mm_processor_kwargs", json.dumps({"max_pixels": MAX_PIXELS}),
           "--allowed-local-media-path", "/", "--chat-template-content-format", "string",
           "--mm-encoder-tp-mode", "data", "--backend", "reference", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log, ready = [], threading.Event()

    def read():
        for line in proc.stderr:
            log.append(line)
            if "Uvicorn running" in line:
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(180):
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(log))
    yield f"http://127.0.0.1:{port}", hf, directory, log
    proc.terminate()
    proc.wait(20)


def _png(width, height, seed):
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    img = Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _transformers_answer(hf, directory, messages, images, max_new_tokens):
    """The prompt as vLLM's "string" content format gives it to transformers' template (placeholders in
    front, joined by newlines), <|image|> expanded per image as Glm4vProcessor does, then greedy generate."""
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    flat = []
    for m in messages:
        if isinstance(m["content"], list):
            texts = [p["text"] for p in m["content"] if p["type"] == "text"]
            n = sum(p["type"] == "image_url" for p in m["content"])
            m = {**m, "content": "\n".join([PLACEHOLDER] * n + ["\n".join(texts)] if texts else [PLACEHOLDER] * n)}
        flat.append(m)
    text = tok.apply_chat_template(flat, tokenize=False, add_generation_prompt=True, chat_template=TEMPLATE)
    kw = {}
    if images:
        proc = transformers.Glm4vImageProcessorPil.from_pretrained(directory,
                                                                  size={"shortest_edge": 12544,
                                                                        "longest_edge": MAX_PIXELS})
        out = proc(images=images, return_tensors="pt")
        kw = dict(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
        counts = iter((out["image_grid_thw"].prod(-1) // 4).tolist())
        text = "".join(part + ("<|image|>" * next(counts) if k < len(images) else "")
                       for k, part in enumerate(text.split("<|image|>")))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    gen = hf.generate(ids, mm_token_type_ids=(ids == 151343).int(), max_new_tokens=max_new_tokens, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, **kw)
    new = gen.sequences[0, ids.shape[1]:].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, new)]
    return ids.shape[1], new, logprobs


def _cases():
    shot, shot_url = _png(112, 168, 1)
    a, a_url = _png(168, 112, 2)
    b, b_url = _png(112, 112, 3)
    system = {"role": "system", "content": "The current date: 2026-11-29. You are a phone agent; "
                                           "answer with do(action=...) or finish(message=...)."}
    return {
        "text only": ([system, {"role": "user", "content": "open the settings app"}], []),
        "screenshot with a system prompt": ([system, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": shot_url}},
            {"type": "text", "text": "** Screen Info **\n{\"current_app\": \"System Home\"}"}]}], [shot]),
        "two images": ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": a_url}}, {"type": "image_url", "image_url": {"url": b_url}},
            {"type": "text", "text": "hello phone"}]}], [a, b]),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_answers_equal_transformers_generate(served, case):
    url, hf, directory, _ = served
    messages, images = _cases()[case]
    body = {"model": "autoglm-phone-9b", "messages": messages, "temperature": 0, "max_tokens": 6, "logprobs": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()
    entries = got["choices"][0]["logprobs"]["content"]
    prompt_tokens, want_ids, want_logprobs = _transformers_answer(hf, directory, messages, images, 6)
    assert [e["token_id"] for e in entries] == want_ids
    assert max(abs(e["logprob"] - w) for e, w in zip(entries, want_logprobs)) < LOGPROB_TOL
    assert got["usage"]["prompt_tokens"] == prompt_tokens
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    assert got["choices"][0]["message"]["content"] == tok.decode(want_ids, skip_special_tokens=True)


def test_open_autoglm_requests_stream_to_done(served):
    url, _, _, log = served
    for case, (messages, _) in _cases().items():
        body = {"model": "autoglm-phone-9b", "messages": messages, "stream": True, "temperature": 0,
                "top_p": 0.85, "frequency_penalty": 0.2, "max_tokens": 3000}
        events, start = [], time.monotonic()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]", case
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), case
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), case
        assert time.monotonic() - start < 300
    assert any("--mm-encoder-tp-mode" in line and "no effect" in line for line in log)
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "autoglm-phone-9b"
