"""The OpenAI-compatible server run for real, for the server tests: uvicorn on a loopback port in a
background thread, the nano preset on the reference backend; request builders and the OpenAI error check."""
import base64
import io
import json
import os
import socket
import threading
import time
import wave

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("PIL")

from autoglm_fast.demo import demo_image, demo_tone  # noqa: E402
from autoglm_fast.engine import Engine, SchedulerConfig  # noqa: E402
from autoglm_fast.server import create_app  # noqa: E402

SCHED = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=256)
MODEL = "autoglm-phone-9b"


def nano_engine():
    return Engine.from_preset("nano", seed=0, backend="reference", scheduler=SCHED)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    def __init__(self, engine, **kw):
        self.engine, port = engine, free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app(engine, **kw), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    demo_image(32).save(allowed / "screen.png")
    demo_image(32).save(root / "secret.png")
    os.symlink(root / "secret.png", allowed / "escape.png")
    return allowed


def serve(request, **kw):
    live = Live(nano_engine(), **kw)
    request.addfinalizer(live.close)
    return live


@pytest.fixture(scope="module")
def live(request, media_dir):
    return serve(request, allowed_local_media_path=str(media_dir), max_images=2)


def png_bytes(size=32):
    buf = io.BytesIO()
    demo_image(size).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(config, seconds=0.5):
    pcm = (demo_tone(config, seconds) * 32767).round().short().numpy().tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(config.audio.sampling_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(content):
    return {"messages": [{"role": "user", "content": content}]}


def sse_events(lines):
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def post(live, body, **kw):
    return httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60, **kw)


def openai_error(r, status) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:300]
    return err
