"""Sampling stage of the engine: per-request `SamplingParams` and a `Sampler` that turns one step's
logits [B, V] into next tokens for a continuously batched set of requests, each with its own
settings.

Semantics follow vLLM's sampler, in far less code: raw logits (fp32) -> min_tokens masking ->
repetition / frequency / presence penalties -> greedy rows take argmax -> temperature -> top-k ->
top-p -> min-p -> exponential-race sampling. Everything is vectorized over the batch on the
logits' device; the only Python loops run over rows (never over the vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by ~0 overflows.
_EPS = 1e-5

# Token ids per row: ragged lists, or a padded [B, L] tensor whose entries < 0 or >= V are padding.
TokenLists = Sequence[Sequence[int]] | torch.Tensor


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Per-request sampling settings, with OpenAI / vLLM names and ranges."""
    max_tokens: int = 256
    temperature: float = 1.0          # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 -> off
    min_p: float = 0.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # top logprobs per token; 0 -> only the chosen token's
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        checks = [  # (field, ok, allowed range) in declaration order, so min_tokens sees a valid max
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an int >= 1"),
            ("temperature", _is_num(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= -1, "an int >= -1 (0 or -1 disables it)"),
            ("min_p", _is_num(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("seed", self.seed is None or (_is_int(self.seed) and self.seed >= 0),
             "None or an int >= 0"),
            ("frequency_penalty", _is_num(self.frequency_penalty)
             and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("presence_penalty", _is_num(self.presence_penalty)
             and -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", _is_num(self.repetition_penalty)
             and self.repetition_penalty > 0, "> 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
             "a list of ints >= 0"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "None or an int in [0, 20]"),
            ("min_tokens", _is_int(self.min_tokens) and _is_int(self.max_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             f"an int in [0, max_tokens={self.max_tokens}]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def greedy(cls, **kwargs) -> SamplingParams:
        return cls(temperature=0.0, **kwargs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _EPS


@dataclass
class SampleOutput:
    tokens: torch.Tensor                   # int64 [B]
    logprobs: torch.Tensor | None          # fp32 [B]: chosen token under the raw logits; None if no row asked
    top_logprobs: list[list[tuple[int, float]]] | None  # per row, best first; [] where not asked


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request RNG: the request's draws depend on its seed alone, not on its batch mates."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def token_counts(tokens: TokenLists, batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] int32 occurrence counts. Rows are padded with id `vocab` into a spare bin that is
    dropped, so ragged rows cost one scatter_add (vLLM's trick)."""
    if isinstance(tokens, torch.Tensor):
        ids = tokens.to(device=device, dtype=torch.long).reshape(batch, -1)
        ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    else:
        width = max((len(t) for t in tokens), default=0)
        padded = [list(t) + [vocab] * (width - len(t)) for t in tokens]
        ids = torch.tensor(padded, dtype=torch.long).reshape(batch, width).to(device)
    counts = torch.zeros(batch, vocab + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, prompt_tokens: TokenLists | None, output_tokens: TokenLists,
                    repetition: torch.Tensor, frequency: torch.Tensor,
                    presence: torch.Tensor) -> torch.Tensor:
    """Penalize fp32 logits [B, V] with per-row [B] penalties (returns a new tensor).

    Repetition (HF/vLLM rule) covers prompt + output tokens: a positive logit is divided by rp, a
    negative one multiplied, so rp > 1 always makes a seen token less likely. Frequency (per
    occurrence) and presence (once) cover output tokens only, OpenAI-style. `prompt_tokens=None`
    means no prompt: the caller passes it when no row uses repetition, to skip counting prompts.
    """
    batch, vocab = logits.shape
    out = token_counts(output_tokens, batch, vocab, logits.device)
    seen = out > 0
    if prompt_tokens is not None:
        seen |= token_counts(prompt_tokens, batch, vocab, logits.device) > 0
    rp = repetition[:, None].to(logits.dtype)
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - frequency[:, None] * out - presence[:, None] * (out > 0)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the tokens outside each row's top-k, nucleus and min-p set (per-row [B] k, p,
    min_p). One descending sort serves all three. Top-p keeps the smallest prefix whose mass
    reaches p (a token stays while the mass strictly above it is < p, so the top token always
    stays); it is computed after top-k, as in vLLM. Min-p drops tokens below min_p * the top prob.
    Rows with k <= 0, p == 1 and min_p == 0 come back unchanged - p == 1 is not compared at all,
    since cumsum rounding could otherwise nibble the tail."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab).long()
    sorted_logits.masked_fill_(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_above = probs.cumsum(-1) - probs
    drop = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1)
    drop |= probs < min_p[:, None] * probs[:, :1]
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    """Picks one next token per running request. `eos_token_ids` are masked (with each request's
    stop_token_ids) until the request has `min_tokens` outputs."""

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = set(eos_token_ids)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               prompt_tokens: TokenLists, output_tokens: Sequence[Sequence[int]],
               generators: Sequence[torch.Generator | None]) -> SampleOutput:
        batch, vocab = logits.shape
        if not len(params) == len(output_tokens) == len(generators) == batch:
            raise ValueError(f"params, output_tokens and generators need one entry per logits row "
                             f"({batch}), got {len(params)}, {len(output_tokens)}, {len(generators)}")
        dev = logits.device
        logits = logits.to(torch.float32, copy=True)   # never touch the caller's tensor
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = logits.log_softmax(-1) if want_logprobs else None

        # All per-row settings in one host -> device copy.
        table = torch.tensor([[p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                               p.frequency_penalty, p.presence_penalty] for p in params],
                             dtype=torch.float32).to(dev)
        temp, top_k, top_p, min_p, rep, freq, pres = table.unbind(1)

        self._mask_early_stops(logits, params, output_tokens)
        if any(p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty
               for p in params):
            uses_rep = any(p.repetition_penalty != 1 for p in params)
            logits = apply_penalties(logits, prompt_tokens if uses_rep else None, output_tokens,
                                     rep, freq, pres)

        tokens = logits.argmax(-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled_rows:
            is_greedy = temp < _EPS
            logits.div_(torch.where(is_greedy, 1.0, temp)[:, None])
            if any(params[i].top_k > 0 or params[i].top_p < 1 or params[i].min_p > 0
                   for i in sampled_rows):
                logits = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
            probs = logits.softmax(-1)
            # Exponential race: argmax(p / E), E ~ Exp(1) iid, is an exact draw from p. Unlike
            # multinomial, the noise is a plain tensor, so seeded rows draw theirs from their own
            # generator (V numbers per step, whatever the batch) and the rest in one call.
            noise = torch.empty_like(probs).exponential_()
            for i in sampled_rows:
                if generators[i] is not None:
                    noise[i].exponential_(generator=generators[i])
            tokens = torch.where(is_greedy, tokens, probs.div_(noise).argmax(-1))

        if raw_logprobs is None:
            return SampleOutput(tokens, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top: list[list[tuple[int, float]]] = [[] for _ in params]
        n = min(max(p.logprobs or 0 for p in params), vocab)
        if n:
            values, ids = raw_logprobs.topk(n, dim=-1)
            values, ids = values.tolist(), ids.tolist()
            top = [list(zip(ids[i][:p.logprobs], values[i][:p.logprobs])) if p.logprobs else []
                   for i, p in enumerate(params)]
        return SampleOutput(tokens, chosen, top)

    def _mask_early_stops(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                          output_tokens: Sequence[Sequence[int]]) -> None:
        """In place: rows short of min_tokens cannot pick a stop token (EOS unless ignore_eos,
        where EOS is no stop anyway, and their stop_token_ids)."""
        rows: list[int] = []
        cols: list[int] = []
        for i, p in enumerate(params):
            if len(output_tokens[i]) < p.min_tokens:
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                ids = [t for t in ids if t < logits.shape[1]]
                rows += [i] * len(ids)
                cols += ids
        if rows:
            logits[rows, cols] = float("-inf")
