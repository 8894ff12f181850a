"""A request's life in the engine: its prompt (with media already encoded at admission), its
generated tokens, how much of its sequence sits in the KV cache, and what it has streamed so far."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"      # not in the cache (new, or preempted and to be recomputed)
    RUNNING = "running"      # owns cache blocks
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One increment of a request: what it added since the last output, and its totals."""
    request_id: str
    text: str                         # new text since the last output
    token_ids: list[int]              # new token ids since the last output
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] | None = None  # per new token: {"token_id", "logprob", "top": [(id, lp), ...]}
    error: str | None = None
    cached_tokens: int = 0            # prompt tokens found in the prefix cache (not prefilled)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    media: dict = field(default_factory=dict)   # preprocessed inputs: pixel_values / input_features / samples
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0                        # tokens of prompt + output already in the KV cache
    prompt_embeds: torch.Tensor | None = None    # [T, H] after splicing and fusion (made once, at admission)
    state: object = None                         # the family's per-request state (set at admission)
    encoded: object = None                       # CUDA event: the encoders' work (on their stream) is done
    generator: torch.Generator | None = None
    detokenizer: object = None
    text: str = ""                               # all text so far (stop strings are searched here)
    sent_text: int = 0                           # characters already streamed
    sent_tokens: int = 0
    pending_logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    media_keys: list = field(default_factory=list)     # prefix caching: (position, media digest), from the family
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of the full blocks so far
    num_cached_tokens: int | None = None         # prompt tokens the prefix cache supplied at first admission

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def ready(self) -> bool:
        """No encoder work in flight for it (on the encoders' stream): it may be scheduled. One not yet
        encoded is encoded when its first step runs."""
        return self.encoded is None or self.encoded.query()

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache: the prompt (or a preempted sequence) to prefill, or 1 to decode."""
        return self.total_len - self.num_computed

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status, self.finish_reason, self.error = Status.FINISHED, reason, error

    def take_output(self) -> RequestOutput:
        """What is new since the last call. While running, text that could be the start of a stop
        string is held back, so a streamed reply never shows part of a stop string."""
        hold = 0 if self.status is Status.FINISHED else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self.sent_text, len(self.text) - hold)
        text, new_ids = self.text[self.sent_text:end], self.output_ids[self.sent_tokens:]
        self.sent_text, self.sent_tokens = end, len(self.output_ids)
        logprobs, self.pending_logprobs = self.pending_logprobs or None, []
        return RequestOutput(self.request_id, text, new_ids, self.status is Status.FINISHED, self.finish_reason,
                             len(self.prompt_ids), len(self.output_ids), logprobs, self.error,
                             self.num_cached_tokens or 0)
