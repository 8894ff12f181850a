"""GLM-4 chat prompts from OpenAI-shaped messages, and splitting `<think>` reasoning from answers.

Prompt layout (token level; `\\n` and message text are ordinary tokens):

    [gMASK]<sop>
    <|system|>\\n{text}   <|user|>\\n{text}   <|assistant|>\\n{text}      one per message
    <|assistant|>\\n<think>                        add_generation_prompt, enable_thinking
    <|assistant|>\\n<think></think>\\n              add_generation_prompt, thinking off

Media parts sit inline where they occur: `<|begin_of_image|><|image|>×N<|end_of_image|>` (audio alike),
with the config's ids, since the model splices embeddings at exactly those. This module never loads
media; it records the parts in order so the caller can encode them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .config import AutoGLMPhoneConfig
from .tokenizer import Tokenizer

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
MEDIA_KINDS = {"image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

MediaTokens = Callable[[dict], "int | None"]


@dataclass
class ChatPrompt:
    token_ids: list[int]
    media: list[dict] = field(default_factory=list)  # {"kind": "image"|"audio", "num_tokens": N, "part": part}
    text: str = ""  # for logs: specials spelled out, placeholder runs collapsed to "<|image|>×N"


def strip_reasoning(text: str) -> str:
    """An earlier assistant turn without its reasoning, as GLM templates do (`split('</think>')[-1]`)."""
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1].lstrip()
    return text.split(THINK_OPEN, 1)[0]  # an unterminated block (a cut-off turn) goes too


class _Builder:
    """Accumulates ids and the log text; runs of plain text are encoded together (as a template
    rendered to one string would be), never with special-token parsing: user text is data."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.log, self._text = tokenizer, [], [], ""

    def text(self, s: str) -> None:
        self._text += s

    def special(self, name: str) -> None:
        self._flush()
        sid = self.tok.special_ids.get(name)  # a tokenizer without think tags gets them as text
        self.ids += [sid] if sid is not None else self.tok.encode(name, allow_special=False)
        self.log.append(name)

    def media(self, kind: str, n: int, config: AutoGLMPhoneConfig) -> None:
        self._flush()
        self.ids += config.placeholder_block(kind, n)
        self.log.append(f"<|begin_of_{kind}|><|{kind}|>×{n}<|end_of_{kind}|>")

    def _flush(self) -> None:
        if self._text:
            self.ids += self.tok.encode(self._text, allow_special=False)
            self.log.append(self._text)
            self._text = ""

    def build(self, media: list[dict]) -> ChatPrompt:
        self._flush()
        return ChatPrompt(self.ids, media, "".join(self.log))


def _parts(msg: dict, where: str) -> list[dict]:
    content = msg.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" and kind not in MEDIA_KINDS:
            raise ValueError(f"{where}: part {k} has unknown type {kind!r}; expected one of "
                             f"{['text', *MEDIA_KINDS]}")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: text part {k} needs a string 'text'")
    return content


def _count(part: dict, kind: str, media_tokens: MediaTokens | None, config: AutoGLMPhoneConfig, where: str) -> int:
    n = media_tokens(part) if media_tokens is not None else None
    if n is None and kind == "image":
        n = config.vision.num_tokens
    if n is None:
        raise ValueError(f"{where}: an audio part needs its placeholder count; pass "
                         "media_tokens=lambda part: ... (e.g. config.audio.num_tokens(num_samples))")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{where}: media_tokens returned {n!r} for a {kind} part; need a positive int")
    return n


def render_chat(messages: list[dict[str, Any]], tokenizer: Tokenizer, config: AutoGLMPhoneConfig, *,
                enable_thinking: bool = True, add_generation_prompt: bool = True,
                media_tokens: MediaTokens | None = None) -> ChatPrompt:
    """Token ids for a GLM-4 prompt (layout in the module docstring).

    `media_tokens(part)` gives the placeholder count of each media part; returning None (or not
    passing it) means the default: `config.vision.num_tokens` for images, an error for audio, whose
    count depends on the clip's length. Earlier assistant turns lose their `<think>` blocks. System
    and user messages must have non-empty content; media belong in user messages.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    b, media = _Builder(tokenizer), []
    b.special("[gMASK]")
    b.special("<sop>")
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ROLE_TOKENS:
            raise ValueError(f"messages[{i}]: unknown role {role!r}; expected one of {list(ROLE_TOKENS)}")
        where = f"messages[{i}] ({role})"
        parts = _parts(msg, where)
        has_media = any(p["type"] in MEDIA_KINDS for p in parts)
        if not has_media and not "".join(p["text"] for p in parts).strip():
            raise ValueError(f"{where}: content is empty")
        if has_media and role != "user":
            raise ValueError(f"{where}: image and audio parts are only allowed in user messages")
        if role == "assistant":
            parts = [{"type": "text", "text": strip_reasoning("".join(p["text"] for p in parts))}]
        b.special(ROLE_TOKENS[role])
        b.text("\n")
        for part in parts:
            kind = MEDIA_KINDS.get(part["type"])
            if kind is None:
                b.text(part["text"])
                continue
            n = _count(part, kind, media_tokens, config, where)
            b.media(kind, n, config)
            media.append({"kind": kind, "num_tokens": n, "part": part})
    if add_generation_prompt:
        b.special("<|assistant|>")
        b.text("\n")
        b.special(THINK_OPEN)
        if not enable_thinking:  # an empty, closed block: the model goes straight to the answer
            b.special(THINK_CLOSE)
            b.text("\n")
    return b.build(media)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """Streaming split of generated text into (reasoning, answer).

    thinking=True (the prompt opened `<think>`): text is reasoning until `</think>`; a stream that
    itself begins with `<think>` has it dropped. thinking=False: everything is answer, verbatim.
    Whitespace choice: the answer's leading whitespace (GLM writes `</think>\\n`) is stripped, so
    `content` starts at its first visible character; reasoning is passed through verbatim. A
    suffix that may be the start of a tag ("</thi") is held back until the next delta decides it.
    """

    def __init__(self, thinking: bool):
        self._state = "start" if thinking else "answer"
        self._buf = ""
        self._lstrip = False

    def feed(self, delta: str) -> tuple[str, str]:
        """Returns (reasoning_delta, content_delta)."""
        self._buf += delta
        reasoning = ""
        if self._state == "start":
            if len(self._buf) < len(THINK_OPEN) and THINK_OPEN.startswith(self._buf):
                return "", ""
            self._buf = self._buf.removeprefix(THINK_OPEN)
            self._state = "reasoning"
        if self._state == "reasoning":
            before, sep, after = self._buf.partition(THINK_CLOSE)
            if not sep:
                keep = _partial_tag(self._buf, THINK_CLOSE)
                reasoning, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return reasoning, ""
            reasoning, self._buf, self._state, self._lstrip = before, after, "answer", True
        if self._lstrip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return reasoning, ""
            self._lstrip = False
        content, self._buf = self._buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Flush at the end of the stream: a held partial tag was reasoning after all; an answer
        that is only whitespace is empty."""
        rest, self._buf = self._buf, ""
        return (rest, "") if self._state != "answer" else ("", "")


class Glm45ReasoningParser:
    """vLLM's `--reasoning-parser glm45` for a model that writes its own `<think>` (GLM-4.1V's prompt does
    not open one): a reply that begins with `<think>` is reasoning until `</think>`, anything else is
    content. Decided as soon as the first characters tell; then a ReasoningParser does the rest."""

    def __init__(self):
        self._buf, self._inner = "", None

    def feed(self, delta: str) -> tuple[str, str]:
        if self._inner is None:
            self._buf += delta
            if len(self._buf) < len(THINK_OPEN) and THINK_OPEN.startswith(self._buf):
                return "", ""
            self._inner = ReasoningParser(thinking=self._buf.startswith(THINK_OPEN))
            delta, self._buf = self._buf, ""
        return self._inner.feed(delta)

    def finish(self) -> tuple[str, str]:
        if self._inner is None:  # a reply shorter than "<think>" that could still have been one
            rest, self._buf = self._buf, ""
            return "", rest
        return self._inner.finish()


def split_glm45(text: str) -> tuple[str, str]:
    """Non-streaming twin of Glm45ReasoningParser: (reasoning, content)."""
    return split_reasoning(text, True) if text.startswith(THINK_OPEN) else ("", text)


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """Non-streaming twin of ReasoningParser: (reasoning, content) of a whole generation."""
    if not thinking:
        return "", text
    reasoning, sep, content = text.removeprefix(THINK_OPEN).partition(THINK_CLOSE)
    return (reasoning, content.lstrip()) if sep else (reasoning, "")
