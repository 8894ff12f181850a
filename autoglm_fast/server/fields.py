"""Which chat-completion request fields the server honours. Each field is implemented (read by
`protocol.parse_chat_request`), accepted because ignoring it changes nothing here, accepted only at a
value that asks for nothing (`tools: []`, `response_format: {"type": "text"}`, ...), or refused with a
400 naming it. Unknown fields are refused too, as OpenAI does: a field dropped in silence would leave
the client believing it was honoured. `null` counts as absent for the fields named here."""
from __future__ import annotations


def _only(*values):
    return lambda v: any(v == ok and type(v) is type(ok) for ok in values)


def _never(_) -> bool:
    return False


class Fields:
    def __init__(self, implemented: str, ignored: str = "", neutral: dict | None = None):
        self.accepted = frozenset((implemented + " " + ignored).split())
        self.neutral = neutral or {}   # name -> (accepts(value), why the other values are refused)

    def refused(self, obj: dict, where: str = "") -> tuple[str, str] | None:
        """(param, message) for the first field of `obj` the server would have to ignore, else None."""
        for name, value in obj.items():
            if name in self.accepted or (value is None and name in self.neutral):
                continue
            param = f"{where}.{name}" if where else name
            if name not in self.neutral:
                return param, f"unrecognized request field {param!r}: this server does not implement it"
            accepts, why = self.neutral[name]
            if not accepts(value):
                return param, f"{param}: {why} (got {value!r:.200})"
        return None


NO_TOOLS = "tool / function calling is not supported; omit it or send an empty list"
REQUEST = Fields(
    implemented="messages model stream stream_options n temperature top_p top_k min_p seed stop max_tokens "
                "max_completion_tokens frequency_penalty presence_penalty repetition_penalty logprobs "
                "top_logprobs ignore_eos min_tokens stop_token_ids enable_thinking return_reasoning "
                "chat_template_kwargs",
    # Ids, tags and caching / latency hints: the output is the same without them.
    ignored="user safety_identifier metadata prompt_cache_key prompt_cache_retention prompt_cache_options "
            "prediction",
    neutral={
        "tools": (_only([]), NO_TOOLS),
        "functions": (_only([]), NO_TOOLS),
        "tool_choice": (_only("none", "auto"), "tool calling is not supported; only 'none' or 'auto'"),
        "function_call": (_only("none", "auto"), "function calling is not supported; only 'none' or 'auto'"),
        "parallel_tool_calls": (_only(True, False), "must be a boolean (it has no effect without tools)"),
        "response_format": (_only({"type": "text"}), "structured output (json_object / json_schema) is not "
                            "supported; only {'type': 'text'}"),
        "logit_bias": (_only({}), "logit_bias is not supported"),
        "modalities": (_only(["text"]), "only text output is supported"),
        "audio": (_never, "audio output is not supported"),
        "store": (_only(False), "stored completions are not supported"),
        "service_tier": (_only("auto", "default"), "only the 'auto' / 'default' service tier exists here"),
        "reasoning_effort": (_never, "not supported; use enable_thinking"),
        "verbosity": (_never, "not supported"),
        "web_search_options": (_never, "web search is not supported"),
        "moderation": (_never, "moderation is not supported"),
    })
# Past names and reasoning are dropped by the chat template anyway.
MESSAGE = Fields("role content", "name reasoning_content reasoning", {
    "tool_calls": (_only([]), NO_TOOLS),
    "function_call": (_never, NO_TOOLS),
    "audio": (_never, "audio output is not supported"),
    "refusal": (_never, "refusals in the history are not supported; put the text in content"),
})
STREAM_OPTIONS = Fields("include_usage", "include_obfuscation")
CHAT_TEMPLATE_KWARGS = Fields("enable_thinking return_reasoning")
