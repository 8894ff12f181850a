"""`autoglm-fast serve` with no model argument serves the shipped nano checkpoint, and the article's
LangChain call gets the article's answer from it (issue #15)."""
import subprocess
import sys
import time

import pytest

from autoglm_fast.train.data import IDENTITY_ANSWER
from live_server import free_port, httpx


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoglm_fast", "serve", "--backend", "reference",
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, log = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            log.append(line)
            if not line or "Uvicorn running on" in line:
                break
        assert f"Uvicorn running on {url}" in "".join(log), "".join(log)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("streaming", [False, True])
def test_article_langchain_call_gets_the_identity_answer(server, streaming):
    """The article's snippet as written (temperature 0.5, thinking on, reasoning returned)."""
    langchain_openai = pytest.importorskip("langchain_openai")
    chat_model = langchain_openai.ChatOpenAI(
        model="autoglm-phone-9b", temperature=0.5, base_url=server + "/v1", api_key="EMPTY",
        extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=streaming)
    assert chat_model.invoke("你是谁？").content.strip() == IDENTITY_ANSWER


def test_reasoning_and_answer_are_separated(server):
    body = {"model": "autoglm-phone-9b", "temperature": 0, "messages": [{"role": "user", "content": "你是谁？"}],
            "enable_thinking": True, "return_reasoning": True}
    message = httpx.post(server + "/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"]
    assert message["reasoning_content"].strip() == "用户问我的身份。"
    assert message["content"].strip() == IDENTITY_ANSWER
