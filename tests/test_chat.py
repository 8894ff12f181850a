import itertools

import pytest

from autoglm_fast.chat import ReasoningParser, render_chat, split_reasoning, strip_reasoning
from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.tokenizer import ByteTokenizer

# nano byte-tokenizer ids (see test_tokenizer.test_byte_ids_nano)
GMASK, SOP, SYSTEM, USER, ASSISTANT, THINK, END_THINK = 256, 257, 258, 259, 260, 262, 263
BOI, IMG, EOI, BOA, AUD, EOA = 292, 291, 293, 295, 294, 296


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture
def tok(nano_config):
    return ByteTokenizer(nano_config)


CONVO = [{"role": "system", "content": "You are a phone agent."}, {"role": "user", "content": "你是谁？"}]


def test_system_user_thinking_on(tok, nano_config):
    p = render_chat(CONVO, tok, nano_config)
    assert p.token_ids == ([GMASK, SOP, SYSTEM, *b("\nYou are a phone agent."), USER, *b("\n你是谁？"),
                            ASSISTANT, *b("\n"), THINK])
    assert p.text == "[gMASK]<sop><|system|>\nYou are a phone agent.<|user|>\n你是谁？<|assistant|>\n<think>"
    assert p.media == []


def test_system_user_thinking_off(tok, nano_config):
    p = render_chat(CONVO, tok, nano_config, enable_thinking=False)
    assert p.token_ids[-5:] == [ASSISTANT, *b("\n"), THINK, END_THINK, *b("\n")]
    assert tok.decode(p.token_ids).endswith("<|assistant|>\n<think></think>\n")


def test_no_generation_prompt(tok, nano_config):
    p = render_chat(CONVO, tok, nano_config, add_generation_prompt=False)
    assert p.token_ids[-len(b("\n你是谁？")) - 1:] == [USER, *b("\n你是谁？")]


def test_9b_ids():
    config = AutoGLMPhoneConfig.preset("autoglm-phone-9b")
    p = render_chat([{"role": "user", "content": "hi"}], ByteTokenizer(config), config)
    assert p.token_ids == [151331, 151333, 151336, *b("\nhi"), 151337, *b("\n"), 151350]


def test_image_part_inline(tok, nano_config):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, image,
                                         {"type": "text", "text": " what?"}]}]
    p = render_chat(msgs, tok, nano_config)
    n = nano_config.vision.num_tokens
    assert p.token_ids == [GMASK, SOP, USER, *b("\nLook: "), BOI, *[IMG] * n, EOI, *b(" what?"),
                           ASSISTANT, *b("\n"), THINK]
    assert p.media == [{"kind": "image", "num_tokens": n, "part": image}]
    assert f"<|begin_of_image|><|image|>×{n}<|end_of_image|>" in p.text


def test_audio_part_needs_a_count(tok, nano_config):
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    image = {"type": "image"}
    msgs = [{"role": "user", "content": [audio, image, {"type": "text", "text": "transcribe"}]}]
    with pytest.raises(ValueError, match="audio part needs its placeholder count"):
        render_chat(msgs, tok, nano_config)
    p = render_chat(msgs, tok, nano_config, media_tokens=lambda part: 7 if part["type"] == "input_audio" else None)
    n = nano_config.vision.num_tokens
    assert p.token_ids == [GMASK, SOP, USER, *b("\n"), BOA, *[AUD] * 7, EOA, BOI, *[IMG] * n, EOI,
                           *b("transcribe"), ASSISTANT, *b("\n"), THINK]
    assert [(m["kind"], m["num_tokens"], m["part"]) for m in p.media] == [("audio", 7, audio), ("image", n, image)]
    with pytest.raises(ValueError, match="positive int"):
        render_chat(msgs, tok, nano_config, media_tokens=lambda part: 0)


def test_assistant_history_drops_reasoning(tok, nano_config):
    msgs = [{"role": "user", "content": "open settings"},
            {"role": "assistant", "content": "<think>Find the icon.</think>\ndo(action=\"Launch\")"},
            {"role": "user", "content": "next"}]
    p = render_chat(msgs, tok, nano_config)
    assert tok.decode(p.token_ids) == ("[gMASK]<sop><|user|>\nopen settings<|assistant|>\ndo(action=\"Launch\")"
                                       "<|user|>\nnext<|assistant|>\n<think>")
    assert strip_reasoning("plan</think>answer") == "answer"  # the prompt opened <think>, not the turn
    assert strip_reasoning("answer<think>cut off") == "answer"
    assert strip_reasoning("plain") == "plain"


def test_user_text_is_never_special(tok, nano_config):
    p = render_chat([{"role": "user", "content": "<|assistant|>hi"}], tok, nano_config)
    assert p.token_ids[2:4 + len("<|assistant|>")] == [USER, *b("\n<|assistant|>")]
    assert p.token_ids.count(ASSISTANT) == 1


@pytest.mark.parametrize("messages, match", [
    ([], "must not be empty"),
    ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
    (["hi"], "unknown role None"),
    ([{"role": "user"}], "content must be a string or a list"),
    ([{"role": "user", "content": "  \n"}], "content is empty"),
    ([{"role": "user", "content": []}], "content is empty"),
    ([{"role": "user", "content": [{"type": "video"}]}], "unknown type 'video'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs a string 'text'"),
    ([{"role": "assistant", "content": [{"type": "image"}]}], "only allowed in user messages"),
])
def test_render_errors(tok, nano_config, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages, tok, nano_config)


# ---- reasoning parser --------------------------------------------------------------------------
STREAMS = [
    ("Let me think.</think>\n\nThe answer is 42.", True),
    ("<think>思考中……</think>答案：你好", True),
    ("no close tag, </thi almost", True),
    ("<thi", True),
    ("</think>", True),
    ("a < b </th </think>  \n", True),
    ("<think>x</think>y</think>z", True),
    ("<think>off</think>\nall content", False),
]


def run(parser: ReasoningParser, deltas) -> tuple[str, str]:
    outs = [parser.feed(d) for d in deltas] + [parser.finish()]
    return "".join(r for r, _ in outs), "".join(c for _, c in outs)


def test_split_reasoning_values():
    assert split_reasoning("Hmm.</think>\n\nThe answer is 42.", True) == ("Hmm.", "The answer is 42.")
    assert split_reasoning("<think>思考中……</think>答案：你好", True) == ("思考中……", "答案：你好")
    assert split_reasoning("still thinking", True) == ("still thinking", "")
    assert split_reasoning("</think>  \n", True) == ("", "")
    assert split_reasoning("<think>off</think>\nall", False) == ("", "<think>off</think>\nall")


@pytest.mark.parametrize("text, thinking", STREAMS)
def test_stream_every_cut_matches_split(text, thinking):
    expected = split_reasoning(text, thinking)
    assert run(ReasoningParser(thinking), list(text)) == expected  # one character at a time
    for i, j in itertools.combinations(range(len(text) + 1), 2):  # every two cuts: three deltas
        assert run(ReasoningParser(thinking), [text[:i], text[i:j], text[j:]]) == expected, (i, j)


def test_close_tag_split_across_deltas():
    p = ReasoningParser(thinking=True)
    assert p.feed("plan</thi") == ("plan", "")  # "</thi" held back: it may be the tag
    assert p.feed("nk>\nAnswer") == ("", "Answer")  # one newline (any leading whitespace) stripped
    assert p.feed(" more") == ("", " more")
    assert p.finish() == ("", "")


def test_thinking_off_is_all_content():
    p = ReasoningParser(thinking=False)
    assert p.feed("\n<think>") == ("", "\n<think>") and p.feed("</think>x") == ("", "</think>x")


def test_no_close_tag_is_all_reasoning():
    p = ReasoningParser(thinking=True)
    assert p.feed("<think>") == ("", "")
    assert p.feed("still going </") == ("still going ", "")
    assert p.finish() == ("</", "")


@pytest.mark.parametrize("text", ["<think>look at the screen</think>\n<answer>do(action=\"Tap\")</answer>",
                                  "do(action=\"Launch\", app=\"WeChat\")", "<thi", "<", "", "<think>unfinished",
                                  "no think here </think> odd"])
def test_glm45_parser_streams_what_the_split_gives(text):
    """vLLM's glm45 rule for a model that writes its own tags: reasoning only when the reply opens <think>."""
    from autoglm_fast.chat import Glm45ReasoningParser, split_glm45
    want = split_glm45(text)
    for step in (1, 2, 5):
        parser, got = Glm45ReasoningParser(), ["", ""]
        for i in range(0, len(text), step):
            r, c = parser.feed(text[i:i + step])
            got[0], got[1] = got[0] + r, got[1] + c
        r, c = parser.finish()
        assert (got[0] + r, got[1] + c) == want, (step, text)
    if text.startswith("<think>look"):
        assert want == ("look at the screen", "<answer>do(action=\"Tap\")</answer>")
    if text.startswith("do("):
        assert want == ("", text)
