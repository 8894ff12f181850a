"""GLM-4.1V chat rendering: equal to transformers' apply_chat_template(tokenize=False) on the real template,
vLLM's string content format for the Open-AutoGLM request shape, and Glm4vProcessor's <|image|> expansion.

tests/fixtures/glm41v_chat_template.jinja is byte-exact (no header: the file is the template) the
"chat_template" of zai-org/GLM-4.1V-9B-Thinking (Hugging Face, revision 3c1471e51dc811b589d4d12b1c1c7c1c941267c2),
as quoted in a public renderer-validation record whose sha256 of the JSON-encoded template (5232dbe7...)
this file reproduces; the same text (modulo one blank line) is in sglang's and vLLM's template-format
detection tests.
"""
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from transformers import PreTrainedTokenizerFast  # noqa: E402

from autoglm_fast.families.glm4v.chat import (IMAGE_PLACEHOLDER, expand_image_tokens,  # noqa: E402
                                              load_chat_template, render_chat)
from helpers import glm_test_tokenizer  # noqa: E402

TEMPLATE = (Path(__file__).parent / "fixtures" / "glm41v_chat_template.jinja").read_text(encoding="utf-8")
IMG = {"type": "image"}
SHOT = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
THOUGHT = '<think>The search box is at the top.</think><answer>do(action="Tap", element=[500,100])</answer>'


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tok, _ = glm_test_tokenizer(tmp_path_factory.mktemp("tok"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TEMPLATE)


CASES = {
    "system+user text": [{"role": "system", "content": "You are a phone agent."},
                         {"role": "user", "content": "Open WeChat"}],
    "user image+text": [{"role": "user", "content": [IMG, {"type": "text", "text": "What is on screen?"}]}],
    "two images": [{"role": "user", "content": [IMG, {"type": "text", "text": "before"}, IMG,
                                                {"type": "text", "text": "after: which changed?"}]}],
    "multi-turn with think": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": [IMG, {"type": "text", "text": "打开微信\n\n{\"current_app\": \"Home\"}"}]},
        {"role": "assistant", "content": THOUGHT},
        {"role": "user", "content": [{"type": "text", "text": "** Screen Info **"}]},
        {"role": "assistant", "content": "plain", "metadata": "tool"},
        {"role": "user", "content": [IMG, {"type": "text", "text": "next"}]}],
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("gen", [True, False])
def test_openai_format_renders_as_transformers(hf, name, gen):
    messages = CASES[name]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    text, images = render_chat(messages, TEMPLATE, add_generation_prompt=gen)
    assert text == want
    assert len(images) == want.count(IMAGE_PLACEHOLDER) == sum(p == IMG for m in messages
                                                                for p in m["content"] if isinstance(p, dict))
    # OpenAI image_url parts are wrapped to {"type": "image"} (as vLLM does) and come back in order
    shots = [dict(m, content=[SHOT if p == IMG else p for p in m["content"]]) if isinstance(m["content"], list)
             else m for m in messages]
    assert render_chat(shots, TEMPLATE, add_generation_prompt=gen) == (want, [SHOT] * len(images))


def test_known_template_behaviours(hf):
    text, _ = render_chat(CASES["multi-turn with think"], TEMPLATE)
    assert text.startswith("[gMASK]<sop><|system|>\nSYS<|user|>\n" + IMAGE_PLACEHOLDER + "打开微信")
    assert "<|assistant|>\n" + THOUGHT + "<|user|>" in text  # earlier reasoning is kept verbatim
    assert "<|assistant|>tool\nplain" in text  # metadata goes right after <|assistant|>
    assert text.endswith("<|assistant|>\n")  # generation prompt: no <think> opened by the template
    # enable_thinking: this template never reads it, so it changes nothing (in transformers neither)
    assert "enable_thinking" not in TEMPLATE
    for thinking in (True, False):
        want = hf.apply_chat_template(CASES["user image+text"], tokenize=False, add_generation_prompt=True,
                                      enable_thinking=thinking)
        assert render_chat(CASES["user image+text"], TEMPLATE, enable_thinking=thinking)[0] == want


def test_transformers_environment_features(hf):
    t = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
         "{% set ns.n = ns.n + 1 %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
         "{{ ns.n }}{{ dict(a=1) | tojson(indent=1) }}{{ tools | tojson }}{{ custom }}"
         "{% if add_generation_prompt %}<&>{% endif %}")
    messages = [{"role": "user", "content": "<b>\"x\"</b>", "reasoning_content": "r"},
                {"role": "assistant", "content": None}, {"role": "user", "content": "z"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=t,
                                  tools=tools, custom="k")
    assert render_chat(messages, t, tools=tools, custom="k")[0] == want
    with pytest.raises(Exception, match="boom"):
        render_chat(messages, "{{ raise_exception('boom') }}")


OPEN_AUTOGLM = [  # phone_agent/agent.py: earlier screenshots are removed, the newest user turn has one
    {"role": "system", "content": "今天的日期是: 2025-01-01\n你是一个智能体分析专家"},
    {"role": "user", "content": [{"type": "text", "text": "打开微信\n\n{\"current_app\": \"System Home\"}"}]},
    {"role": "assistant", "content": THOUGHT},
    {"role": "user", "content": [SHOT, {"type": "text", "text": "** Screen Info **\n\n{\"current_app\": \"WeChat\"}"}]},
]


def test_string_format_is_what_vllm_renders_for_open_autoglm(hf):
    text, images = render_chat(OPEN_AUTOGLM, TEMPLATE, content_format="string")
    assert images == [SHOT]
    assert text == ("[gMASK]<sop><|system|>\n今天的日期是: 2025-01-01\n你是一个智能体分析专家"
                    "<|user|>\n打开微信\n\n{\"current_app\": \"System Home\"}"
                    "<|assistant|>\n" + THOUGHT +
                    "<|user|>\n" + IMAGE_PLACEHOLDER + "\n** Screen Info **\n\n{\"current_app\": \"WeChat\"}"
                    "<|assistant|>\n")
    # = the template given vLLM's flattened strings; differs from "openai" by the "\n" after the image
    def vllm_string(content):
        if isinstance(content, str):
            return content
        n_images = sum(part.get("type") == "image_url" for part in content)
        return "\n".join([IMAGE_PLACEHOLDER] * n_images + [p["text"] for p in content if p["type"] == "text"])
    flat = [dict(m, content=vllm_string(m["content"])) for m in OPEN_AUTOGLM]
    assert text == hf.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    openai, _ = render_chat(OPEN_AUTOGLM, TEMPLATE)
    assert openai == text.replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER)


@pytest.mark.parametrize("content, want", [
    ([{"type": "text", "text": "a"}, SHOT, {"type": "text", "text": "b"}], f"{IMAGE_PLACEHOLDER}\na\nb"),
    ([SHOT, SHOT], f"{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}"),
    (["a", {"type": "text", "text": "b"}], "a\nb"),
    ([SHOT, {"type": "text", "text": f"see {IMAGE_PLACEHOLDER} here"}], f"see {IMAGE_PLACEHOLDER} here"),
    ([SHOT, {"type": "text", "text": ""}], IMAGE_PLACEHOLDER),
])
def test_string_format_flattening(content, want):
    text, _ = render_chat([{"role": "user", "content": content}], "{{ messages[0].content }}",
                          content_format="string")
    assert text == want
    two = {"type": "text", "text": IMAGE_PLACEHOLDER * 2}  # more spelled out than images: vLLM's error
    with pytest.raises(ValueError, match="more"):
        render_chat([{"role": "user", "content": [SHOT, two]}], TEMPLATE, content_format="string")
    # without any image vLLM checks nothing: the text passes through (and tokenizes to an image token,
    # which expand_image_tokens then refuses for want of an image)
    assert render_chat([{"role": "user", "content": [two]}], "{{ messages[0].content }}",
                       content_format="string") == (two["text"], [])


def test_image_expansion_matches_the_processor_on_text(hf):
    text, images = render_chat(CASES["two images"], TEMPLATE)
    image_id = hf.convert_tokens_to_ids("<|image|>")
    counts = [3, 5]
    it = iter(counts)  # Glm4vProcessor: the k-th "<|image|>" in the text becomes counts[k] of them
    expanded_text = re.sub(re.escape("<|image|>"), lambda m: "<|image|>" * next(it), text)
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert expand_image_tokens(ids, image_id, counts) == hf(expanded_text, add_special_tokens=False)["input_ids"]
    assert expand_image_tokens([1, 2], image_id, []) == [1, 2]
    with pytest.raises(ValueError, match="2 image tokens.*3 images"):
        expand_image_tokens(ids, image_id, [1, 2, 3])
    with pytest.raises(ValueError, match="positive"):
        expand_image_tokens(ids, image_id, [1, 0])


def test_load_chat_template_order_and_agreement_with_transformers(tmp_path):
    glm_test_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_chat_template(tmp_path)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                 {"name": "default", "template": "D"}]}))
    assert load_chat_template(tmp_path) == "D"
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path).get_chat_template() == "D"
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}]}))
    with pytest.raises(ValueError, match="no 'default'"):
        load_chat_template(tmp_path)
    cfg.write_text(json.dumps({"chat_template": TEMPLATE}))
    assert load_chat_template(tmp_path) == TEMPLATE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert load_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").write_text("K", encoding="utf-8")
    assert load_chat_template(tmp_path) == "K" == PreTrainedTokenizerFast.from_pretrained(tmp_path).chat_template


@pytest.mark.parametrize("messages, error, where", [
    ([], ValueError, "non-empty"),
    (["hi"], TypeError, r"messages\[0\]"),
    ([{"content": "x"}], ValueError, r"messages\[0\]\.role"),
    ([{"role": "user", "content": 3}], TypeError, r"messages\[0\]\.content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "video_url"}]}], ValueError,
     r"messages\[1\]\.content\[0\]\.type"),
    ([{"role": "user", "content": [IMG, {"type": "text", "text": None}]}], TypeError,
     r"messages\[0\]\.content\[1\]\.text"),
    ([{"role": "user", "content": [7]}], TypeError, r"messages\[0\]\.content\[0\]"),
])
def test_bad_messages_name_the_field(messages, error, where):
    with pytest.raises(error, match=where):
        render_chat(messages, TEMPLATE)
    with pytest.raises(ValueError, match="content_format"):
        render_chat([{"role": "user", "content": "x"}], TEMPLATE, content_format="auto")
