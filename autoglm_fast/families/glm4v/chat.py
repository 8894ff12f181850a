"""GLM-4.1V (AutoGLM-Phone-9B) prompts: the checkpoint's own Jinja chat template, rendered the way
transformers' `apply_chat_template(tokenize=False)` renders it, with vLLM's two content formats.

    content_format="openai"  list contents reach the template as parts ({"type": "text", "text": ...},
                             {"type": "image"}, as vLLM wraps them); GLM-4.1V's template writes
                             <|begin_of_image|><|image|><|end_of_image|> for each image part itself.
    content_format="string"  list contents are flattened to one string first, as vLLM's
                             `--chat-template-content-format string` does (see `_flatten`).

The rendered text still holds one <|image|> per image: tokenize it with special tokens parsed, then
`expand_image_tokens` gives each image its number of tokens (what Glm4vProcessor does on the text).
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<|begin_of_image|><|image|><|end_of_image|>"
IMAGE_TYPES = ("image_url", "image", "input_image")
TEXT_TYPES = ("text", "input_text")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases


def load_chat_template(directory: str | Path) -> str:
    """The template transformers would use: chat_template.jinja, else chat_template.json's
    "chat_template" (the processors' legacy file), else tokenizer_config.json's "chat_template" (a
    string, or a list of {"name", "template"} from which "default" is taken)."""
    d = Path(directory)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if not (d / name).is_file():
            continue
        template = json.loads((d / name).read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if not isinstance(named.get("default"), str):
                raise ValueError(f"{d / name}: chat_template lists {sorted(map(str, named))} but no 'default'")
            return named["default"]
        if isinstance(template, str):
            return template
    raise ValueError(f"{d}: no chat template (looked for chat_template.jinja, chat_template.json and "
                     "tokenizer_config.json's \"chat_template\")")


@lru_cache(maxsize=16)
def _compile(template: str):
    """transformers' environment (chat_template_utils._cached_compile_jinja_template): immutable sandbox,
    trim_blocks + lstrip_blocks, loopcontrols, {% generation %} blocks, raise_exception, a tojson that
    does not HTML-escape, strftime_now, a dict() that only builds dicts, and a namespace() that refuses
    underscore attributes."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (sandbox fixes); found {jinja2.__version__}")

    class Generation(jinja2.ext.Extension):  # transformers' AssistantTracker, minus the token masks
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attributes may not start with '_': {name!r}")

    class TemplateDict:  # dict() and dict.fromkeys(), nothing else of the type
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=Namespace)
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """JSON-shaped copies only reach the sandbox (transformers' _plain_template_data)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (tuple if isinstance(value, tuple) else list)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _parts(content: list, where: str) -> list[tuple[str, Any]]:
    """("text", str) / ("image", part) per part, in order; plain strings are text (vLLM accepts them)."""
    out = []
    for k, part in enumerate(content):
        at = f"{where}[{k}]"
        if isinstance(part, str):
            out.append(("text", part))
            continue
        if not isinstance(part, dict):
            raise TypeError(f"{at}: a content part must be an object or a string, got {type(part).__name__}")
        kind = part.get("type", "image_url" if "image_url" in part else None)
        if kind in TEXT_TYPES:
            if not isinstance(part.get("text"), str):
                raise TypeError(f"{at}.text: must be a string, got {type(part.get('text')).__name__}")
            out.append(("text", part["text"]))
        elif kind in IMAGE_TYPES:
            out.append(("image", part))
        else:
            raise ValueError(f"{at}.type: unsupported content part type {kind!r}; "
                             f"expected one of {[*TEXT_TYPES, *IMAGE_TYPES]}")
    return out


def _flatten(texts: list[str], n_images: int, placeholder: str) -> str:
    """vLLM's string content format, interleave_mm_strings off (its default): vllm/entrypoints/chat_utils.py
    `_parse_chat_message_content_parts` + `_get_full_multimodal_text_prompt`. Text parts are joined with
    "\\n"; placeholders the text already spells out count as images; each remaining image's placeholder
    (vllm/model_executor/models/glm4_1v.py `get_placeholder_str`: <|begin_of_image|><|image|><|end_of_image|>)
    goes in front, all joined with "\\n", wherever the image parts stood in the list."""
    text = "\n".join(texts)
    if not n_images:
        return text
    missing = n_images - text.count(placeholder)
    if missing < 0:
        raise ValueError(f"Found more '{placeholder}' placeholders in the text than images ({n_images})")
    return "\n".join([placeholder] * missing + ([text] if text else []))


def render_chat(messages: list[dict], template: str, *, add_generation_prompt: bool = True,
                content_format: str = "openai", image_placeholder: str = IMAGE_PLACEHOLDER,
                **template_kwargs: Any) -> tuple[str, list[dict]]:
    """(prompt text, image parts in order). `template_kwargs` reach the template as variables, as
    apply_chat_template's kwargs do (tools, documents, enable_thinking, bos_token, ...)."""
    if content_format not in ("openai", "string"):
        raise ValueError(f"content_format must be 'openai' or 'string', got {content_format!r}")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    conversation, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TypeError(f"{where}: must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise ValueError(f"{where}.role: must be a non-empty string, got {message.get('role')!r}")
        msg = {k: v for k, v in message.items() if v is not None}  # transformers drops None-valued keys
        content = msg.get("content")
        if isinstance(content, list):
            parts = _parts(content, f"{where}.content")
            images += [p for kind, p in parts if kind == "image"]
            if content_format == "string":
                msg["content"] = _flatten([p for kind, p in parts if kind == "text"],
                                          sum(kind == "image" for kind, _ in parts), image_placeholder)
            else:
                msg["content"] = [{"type": "text", "text": p} if kind == "text" else {"type": "image"}
                                  for kind, p in parts]
        elif content is not None and not isinstance(content, str):
            raise TypeError(f"{where}.content: must be a string or a list of parts, got {type(content).__name__}")
        msg = _plain(msg)
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        conversation.append(msg)
    kwargs = _plain({"tools": None, "documents": None, **template_kwargs})
    text = _compile(template).render(messages=conversation, add_generation_prompt=add_generation_prompt, **kwargs)
    return text, images


def expand_image_tokens(ids: list[int], image_token_id: int, tokens_per_image: list[int]) -> list[int]:
    """Each `image_token_id` becomes tokens_per_image[k] copies of itself, k-th occurrence k-th count:
    Glm4vProcessor's text-side replacement, at token level (<|image|> is one special token)."""
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(tokens_per_image):
        raise ValueError(f"the prompt has {found} image tokens (id {image_token_id}) but "
                         f"{len(tokens_per_image)} images were given")
    for k, n in enumerate(tokens_per_image):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tokens_per_image[{k}] must be a positive int, got {n!r}")
    counts, out = iter(tokens_per_image), []
    for t in ids:
        out.extend([t] * next(counts) if t == image_token_id else (t,))
    return out
