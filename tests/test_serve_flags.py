"""`autoglm-fast serve` takes Open-AutoGLM's vLLM command line: vLLM's flags with vLLM's meaning, in
either spelling; vLLM-only engine tunings warn and change nothing; bad values exit 2 naming the flag."""
import argparse
import shlex

import pytest

from autoglm_fast.server.cli import add_arguments

# Open-AutoGLM's README (zai-org/Open-AutoGLM), the arguments after `python3 -m vllm.entrypoints.openai.api_server`
OPEN_AUTOGLM = r"""
 --served-model-name autoglm-phone-9b
 --allowed-local-media-path /
 --mm-encoder-tp-mode data
 --mm_processor_cache_type shm
 --mm_processor_kwargs "{\"max_pixels\":5000000}"
 --max-model-len 25480
 --chat-template-content-format string
 --limit-mm-per-prompt "{\"image\":10}"
 --model zai-org/AutoGLM-Phone-9B
 --port 8000
"""


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="autoglm-fast serve")
    add_arguments(p)
    return p.parse_args(list(argv))


def test_open_autoglm_command_line(capsys):
    args = parse(*shlex.split(OPEN_AUTOGLM))
    assert args.served_model_name == "autoglm-phone-9b"
    assert args.allowed_local_media_path == "/"
    assert args.mm_processor_kwargs == {"max_pixels": 5000000}
    assert args.max_model_len == 25480
    assert args.chat_template_content_format == "string"
    assert args.limit_mm_per_prompt == {"image": 10} and args.max_images == 10
    assert args.model == "zai-org/AutoGLM-Phone-9B" and args.preset is None
    assert args.port == 8000 and args.host == "0.0.0.0"
    assert args.ignored_vllm_flags == ["--mm-encoder-tp-mode", "--mm_processor_cache_type"]
    assert not hasattr(args, "mm_encoder_tp_mode") and not hasattr(args, "mm_processor_cache_type")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("WARNING: --mm-encoder-tp-mode data:") and "no effect" in err[0]
    assert err[1].startswith("WARNING: --mm_processor_cache_type shm:") and "no effect" in err[1]
    # defaults the command leaves alone
    assert (args.dtype, args.reasoning_parser, args.reasoning_format) == ("auto", "none", "separate")


def test_defaults_are_unchanged():
    args = parse()
    assert (args.host, args.port, args.served_model_name, args.max_model_len, args.max_images) == (
        "0.0.0.0", 8000, "autoglm-phone-9b", 4096, 8)
    assert args.limit_mm_per_prompt == {"image": 8}
    assert (args.mm_processor_kwargs, args.allowed_local_media_path, args.api_key) == (None, None, None)
    assert (args.chat_template_content_format, args.dtype, args.reasoning_parser) == ("openai", "auto", "none")
    assert (args.max_concurrency, args.max_queued, args.max_body_bytes) == (32, 256, 64 * 2**20)
    assert args.ignored_vllm_flags == []


DASHED = ["--served-model-name", "m", "--max-model-len", "100", "--allowed-local-media-path", "/tmp",
          "--chat-template-content-format", "string", "--reasoning-parser", "glm45", "--mm-processor-kwargs",
          '{"min_pixels": 1}', "--limit-mm-per-prompt", '{"image": 3}', "--max-concurrency", "4",
          "--max-body-mb", "2", "--api-key", "k", "--reasoning-format", "inline", "--max-queued", "9"]


def test_underscore_and_dash_spellings_are_equal(capsys):
    underscored = ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in DASHED]
    assert underscored != DASHED
    assert vars(parse(*underscored)) == vars(parse(*DASHED))
    with_equals = [f"{a}={b}" for a, b in zip(underscored[::2], underscored[1::2])]
    assert vars(parse(*with_equals)) == vars(parse(*DASHED))
    a = parse("--trust-remote-code", "--max-images", "2")
    b = parse("--trust_remote_code", "--max_images", "2")
    assert vars(b) == {**vars(a), "ignored_vllm_flags": ["--trust_remote_code"]}


def test_vllm_only_flags_warn_once_each_and_change_nothing(capsys):
    argv = ["--trust-remote-code", "--gpu-memory-utilization", "0.9", "--enforce-eager", "--mm-encoder-tp-mode",
            "data", "--mm_processor_cache_type", "lru", "--gpu_memory_utilization", "0.5"]
    args = parse(*argv)
    err = capsys.readouterr().err.splitlines()
    named = [a for a in argv if a.startswith("-") and not a[1:].replace(".", "").isdigit()]
    assert args.ignored_vllm_flags == named
    assert len(err) == len(named)
    for flag, line in zip(named, err):
        assert line.startswith(f"WARNING: {flag}") and "no effect" in line
    assert vars(args) == {**vars(parse()), "ignored_vllm_flags": named}


@pytest.mark.parametrize("argv", [["--tensor-parallel-size", "2"], ["-tp", "2"], ["--tensor_parallel_size=2"]])
def test_tensor_parallel_size_is_real_in_each_spelling(capsys, argv):
    assert parse(*argv).tensor_parallel_size == 2 and parse().tensor_parallel_size == 1
    assert capsys.readouterr().err == ""  # no "no effect" warning: the engine runs N ranks


@pytest.mark.parametrize("argv, message", [
    (["--tensor-parallel-size", "0"], "argument --tensor-parallel-size/-tp: must be a positive integer, got '0'"),
    (["-tp", "two"], "must be a positive integer, got 'two'"),
    (["--tensor_parallel_size", "-2"], "argument --tensor_parallel_size: must be a positive integer"),
    (["--limit-mm-per-prompt", "{image:10}"], "argument --limit-mm-per-prompt: not valid JSON"),
    (["--limit_mm_per_prompt", "[10]"], "argument --limit_mm_per_prompt: must be a JSON object"),
    (["--limit-mm-per-prompt", '{"image": "10"}'], "argument --limit-mm-per-prompt: 'image' must map to a count"),
    (["--limit-mm-per-prompt", '{"image": -1}'], "must map to a count >= 0"),
    (["--mm-processor-kwargs", "max_pixels=5"], "argument --mm-processor-kwargs: not valid JSON"),
    (["--mm_processor_kwargs", "5000000"], "argument --mm_processor_kwargs: must be a JSON object"),
    (["--chat-template-content-format", "json"], "argument --chat-template-content-format: invalid choice"),
    (["--reasoning-parser", "deepseek_r1"], "argument --reasoning-parser: invalid choice"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--max-model-len", "0"], "argument --max-model-len: must be a positive number of tokens"),
    (["--max_model_len", "lots"], "argument --max_model_len: must be a positive number"),
    (["--gpu-memory-utilization", "most"], "argument --gpu-memory-utilization: invalid float value"),
])
def test_bad_values_exit_2_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_vllm_value_forms():
    assert parse("--dtype", "half").dtype == "float16" and parse("--dtype", "float").dtype == "float32"
    assert parse("--dtype", "bfloat16").dtype == "bfloat16"
    assert parse("--max-model-len", "25k").max_model_len == 25000
    assert parse("--max-model-len", "32K").max_model_len == 32768
    assert parse("--chat-template-content-format", "auto").chat_template_content_format == "openai"
    # --max-images is --limit-mm-per-prompt's "image"; the later flag wins, other modalities are kept
    args = parse("--limit-mm-per-prompt", '{"image": 10, "video": 0}', "--max-images", "3")
    assert args.limit_mm_per_prompt == {"image": 3, "video": 0} and args.max_images == 3
    args = parse("--max_images", "3", "--limit-mm-per-prompt", '{"image": 10}')
    assert args.limit_mm_per_prompt == {"image": 10} and args.max_images == 10
    args = parse("--max-images", "3", "--limit-mm-per-prompt", '{"video": 1}')
    assert args.limit_mm_per_prompt == {"image": 3, "video": 1} and args.max_images == 3


@pytest.mark.parametrize("argv, expected", [((), None), (("--no-prefix-caching",), False),
                                            (("--no_enable_prefix_caching",), False),
                                            (("--enable-prefix-caching",), True)])
def test_prefix_caching_flags(argv, expected):
    """None: the engine's default (on for the fast backend, off for the reference one)."""
    assert parse(*argv).enable_prefix_caching is expected
