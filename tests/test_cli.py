"""The console script: the demo runs end to end; bad arguments give a clear error and exit code 2."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "autoglm-fast")  # the console script installed beside this Python


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def test_demo_answers_a_vision_an_audio_and_a_text_question():
    """The shipped nano checkpoint: a blue triangle, three beeps, and the article's identity question."""
    from autoglm_fast.train.data import IDENTITY_ANSWER
    proc = run("demo", "--backend", "reference")
    assert proc.returncode == 0, proc.stderr
    answers = [line.split("-> ", 1)[1].rsplit("   (", 1)[0] for line in proc.stdout.splitlines() if "  -> " in line]
    assert answers == ["triangle", "3", IDENTITY_ANSWER], proc.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "--preset", "nope", "--prompt", "x"), "unknown preset 'nope'"),
    (("demo", "--max-tokens", "0"), "max_tokens must be"),
    (("demo", "--model", "/nonexistent"), "/nonexistent"),
])
def test_cli_errors_are_clear(args, message):
    proc = run(*args)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("command", [(), ("generate",), ("demo",), ("serve",), ("bench",), ("info",), ("eval",)])
def test_every_help_page_renders(command):
    proc = run(*command, "--help")
    assert proc.returncode == 0 and "usage: autoglm-fast" in proc.stdout, proc.stderr[-2000:]


def test_info_counts_the_full_preset_without_allocating():
    proc = run("info", "--preset", "autoglm-phone-9b")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parameters"]["total"] == 9_005_654_019


def test_kernels_install_under_the_package_not_top_level():
    import autoglm_fast.kernels  # noqa: F401  (package_dir maps kernels/ here)
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kernels') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0
    assert importlib.util.find_spec("autoglm_fast.kernels") is not None


def test_generate_streams_an_answer_with_media_and_reports_speed(tmp_path):
    media = run("demo", "--write-media", str(tmp_path))
    assert media.returncode == 0, media.stderr
    image, audio = media.stdout.split()
    proc = run("generate", "--preset", "nano", "--backend", "reference", "--image", image, "--audio", audio,
               "--prompt", "what is this?", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "4 generated (length)" in proc.stderr and "time to first token" in proc.stderr
    bad = run("generate", "--preset", "nano", "--backend", "reference", "--image", str(tmp_path / "beeps.wav"),
              "--prompt", "x")
    assert bad.returncode == 2 and "image" in bad.stderr


def test_generate_from_a_checkpoint_without_a_tokenizer_fails_clearly(tmp_path):
    from autoglm_fast.config import AutoGLMPhoneConfig
    from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
    AutoGLMPhoneForCausalLM.from_config(AutoGLMPhoneConfig.preset("nano")).save_pretrained(tmp_path)
    args = ("generate", "--model", str(tmp_path), "--backend", "reference", "--prompt", "x", "--max-tokens", "1")
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert f"autoglm-fast: error: {tmp_path}: no tokenizer.json" in proc.stderr and "--tokenizer bytes" in proc.stderr
    proc = run(*args, "--tokenizer", "bytes")
    assert proc.returncode == 0 and "1 generated" in proc.stderr, proc.stderr
    proc = run("serve", "--model", str(tmp_path), "--backend", "reference", "--port", "1")  # fails before binding
    assert proc.returncode == 2 and f"{tmp_path}: no tokenizer.json" in proc.stderr, proc.stderr
