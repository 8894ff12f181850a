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


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, seen: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Penalize fp32 logits [B, V] with per-row [B] penalties (returns a new tensor).

    Repetition (HF/vLLM rule) covers the `seen` tokens [B, V] (prompt + output where a row uses it): a
    positive logit is divided by rp, a negative one multiplied, so rp > 1 always makes a seen token less
    likely. Frequency (per occurrence) and presence (once) cover the output counts [B, V] only, OpenAI-style.
    """
    rp = repetition[:, None].to(logits.dtype)
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)


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


@dataclass(frozen=True)
class SamplingPlan:
    """Which stages a batch's sampling runs, from its rows' settings (host data only). Each distinct plan
    is one static program, so a CUDA graph can be captured per plan: a greedy batch never sorts the
    vocabulary. `seeded` rows draw from their own torch.Generator, which a graph cannot replay: such a
    batch samples eagerly (the per-batch fallback)."""
    penalties: bool = False    # frequency / presence / repetition
    repetition: bool = False   # repetition needs the prompt's tokens too
    sampled: bool = False      # some row is not greedy
    filters: bool = False      # top-k / top-p / min-p on a sampled row
    min_tokens: bool = False   # some row may not stop yet
    logprobs: int = -1         # top logprobs to return (0: the chosen token's only; -1: none)
    seeded: bool = False

    @classmethod
    def of(cls, params: Sequence[SamplingParams], below_min: Sequence[bool] = ()) -> "SamplingPlan":
        sampled = [p for p in params if not p.is_greedy]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(penalties=any(p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty
                                 for p in params),
                   repetition=any(p.repetition_penalty != 1 for p in params), sampled=bool(sampled),
                   filters=any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in sampled),
                   min_tokens=any(below_min), logprobs=max(asked, default=-1),
                   seeded=any(p.seed is not None for p in sampled))


@dataclass
class SampleOutput:
    tokens: torch.Tensor                   # int64 [B]
    logprobs: torch.Tensor | None          # fp32 [B]: chosen token under the raw logits; None if no row asked
    top_logprobs: list[list[tuple[int, float]]] | None  # per row, best first; [] where not asked
    top_values: torch.Tensor | None = None  # fp32 [B, plan.logprobs], the device form of top_logprobs
    top_ids: torch.Tensor | None = None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request RNG: the request's draws depend on its seed alone, not on its batch mates."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class SamplingTable:
    """Per-row sampling state on the device, as vLLM's persistent batch keeps it: each running request
    owns a row, written once when it takes the row, and a step samples any rows by index - with no
    host data, so the whole decode step, sampling included, can be one CUDA graph. The step's own
    bookkeeping (the row's last token, its output-token counts for the penalties) is done on the device
    by `sample` itself."""

    def __init__(self, num_rows: int, vocab: int, device: torch.device | str, eos_token_ids: Iterable[int] = (),
                 never_sample: Iterable[int] = ()):
        """never_sample: ids no row may pick (input-only placeholders), masked before anything else."""
        dev = torch.device(device)
        self.eos_token_ids, self.vocab, self.device = set(eos_token_ids), vocab, dev
        self.settings = torch.zeros(num_rows, 7, dtype=torch.float32, device=dev)  # see set_row
        self.output_counts = torch.zeros(num_rows, vocab, dtype=torch.int32, device=dev)
        self.prompt_seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=dev)
        self.stop_mask = torch.zeros(num_rows, vocab, dtype=torch.bool, device=dev)  # blocked below min_tokens
        self.last_token = torch.zeros(num_rows, dtype=torch.int64, device=dev)
        self.never = torch.zeros(vocab, dtype=torch.bool, device=dev)
        self.never[[t for t in never_sample if 0 <= t < vocab]] = True

    def set_row(self, row: int, params: SamplingParams, prompt_ids: Sequence[int],
                output_ids: Sequence[int] = ()) -> None:
        """Give a request row `row` (a new one, or one resuming after preemption with its outputs)."""
        p, dev = params, self.device
        self.settings[row] = torch.tensor([p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                                           p.frequency_penalty, p.presence_penalty])
        self.output_counts[row] = token_counts([output_ids], 1, self.vocab, dev)[0]
        self.prompt_seen[row] = False
        if p.repetition_penalty != 1:
            self.prompt_seen[row] = token_counts([prompt_ids], 1, self.vocab, dev)[0] > 0
        self.stop_mask[row] = False
        stops = [t for t in set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids) if t < self.vocab]
        if p.min_tokens and stops:
            self.stop_mask[row, stops] = True
        self.last_token[row] = output_ids[-1] if output_ids else 0

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, plan: SamplingPlan,
               below_min: torch.Tensor | None = None,
               generators: Sequence[torch.Generator | None] | None = None) -> SampleOutput:
        """Next tokens for logits [B, V] of rows `rows` [B] (device int64), in vLLM's order: raw logits
        (fp32) -> never_sample -> min_tokens masking -> repetition / frequency / presence penalties ->
        greedy rows take argmax -> temperature -> top-k -> top-p -> min-p -> an exponential race.
        below_min [B] bool: rows short of min_tokens (plan.min_tokens). generators: per row, for seeded
        rows (eager only). No host synchronization: the outputs stay on the device."""
        logits = logits.to(torch.float32, copy=True)  # never touch the caller's tensor
        logits.masked_fill_(self.never, float("-inf"))
        raw_logprobs = logits.log_softmax(-1) if plan.logprobs >= 0 else None
        temp, top_k, top_p, min_p, rep, freq, pres = self.settings[rows].unbind(1)
        if plan.min_tokens:
            logits.masked_fill_(self.stop_mask[rows] & below_min[:, None], float("-inf"))
        if plan.penalties:
            counts = self.output_counts[rows]
            seen = (counts > 0) | self.prompt_seen[rows] if plan.repetition else counts > 0
            logits = apply_penalties(logits, counts, seen, rep, freq, pres)
        tokens = logits.argmax(-1)
        if plan.sampled:
            is_greedy = temp < _EPS
            logits.div_(torch.where(is_greedy, 1.0, temp)[:, None])
            if plan.filters:
                logits = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
            probs = logits.softmax(-1)
            # Exponential race: argmax(p / E), E ~ Exp(1) iid, is an exact draw from p. Unlike
            # multinomial, the noise is a plain tensor, so seeded rows draw theirs from their own
            # generator (V numbers per step, whatever the batch) and the rest in one call.
            noise = torch.empty_like(probs).exponential_()
            for i, g in enumerate(generators or ()):
                if g is not None:
                    noise[i].exponential_(generator=g)
            tokens = torch.where(is_greedy, tokens, probs.div_(noise).argmax(-1))
        self.last_token[rows] = tokens
        self.output_counts.index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
        if raw_logprobs is None:
            return SampleOutput(tokens, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        values = ids = None
        if plan.logprobs > 0:
            values, ids = raw_logprobs.topk(min(plan.logprobs, self.vocab), dim=-1)
        return SampleOutput(tokens, chosen, None, values, ids)


def pack(out: SampleOutput) -> torch.Tensor:
    """A step's sampled tokens and logprobs as one fp64 tensor [B, 1 (+1 (+2k))] (ids are exact in fp64),
    so that one device-to-host read brings everything back."""
    cols = [out.tokens.double()[:, None]]
    if out.logprobs is not None:
        cols.append(out.logprobs.double()[:, None])
    if out.top_ids is not None:
        cols += [out.top_ids.double(), out.top_values.double()]
    return torch.cat(cols, 1) if len(cols) > 1 else cols[0]


def unpack(row: list[float], params: SamplingParams) -> tuple[int, float | None, list[tuple[int, float]]]:
    """One row of `pack(...).tolist()`: (token, its logprob or None, [(id, logprob)] best first)."""
    token = int(row[0])
    if params.logprobs is None:
        return token, None, []
    k = (len(row) - 2) // 2
    top = list(zip((int(i) for i in row[2:2 + k]), row[2 + k:]))[:params.logprobs]
    return token, row[1], top


def top_logprob_lists(params: Sequence[SamplingParams], values: list | None, ids: list | None) -> list:
    """Per row, [(id, logprob)] best first, as many as the row asked for (host lists of the top tensors)."""
    return [list(zip(ids[i][:p.logprobs], values[i][:p.logprobs])) if p.logprobs and ids else []
            for i, p in enumerate(params)]


class Sampler:
    """One-shot sampling of a batch given as host lists (tests, tools): a SamplingTable with a row per
    logits row, then the very code the engine runs on its persistent rows. `eos_token_ids` are masked
    (with each request's stop_token_ids) until the request has `min_tokens` outputs."""

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = set(eos_token_ids)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               prompt_tokens: Sequence[Sequence[int]], output_tokens: Sequence[Sequence[int]],
               generators: Sequence[torch.Generator | None]) -> SampleOutput:
        batch, vocab = logits.shape
        if not len(params) == len(output_tokens) == len(generators) == batch:
            raise ValueError(f"params, output_tokens and generators need one entry per logits row "
                             f"({batch}), got {len(params)}, {len(output_tokens)}, {len(generators)}")
        table = SamplingTable(batch, vocab, logits.device, self.eos_token_ids)
        for i, p in enumerate(params):
            table.set_row(i, p, prompt_tokens[i], output_tokens[i])
        below = [len(output_tokens[i]) < p.min_tokens for i, p in enumerate(params)]
        rows = torch.arange(batch, device=logits.device)
        out = table.sample(logits, rows, SamplingPlan.of(params, below), torch.tensor(below, device=logits.device),
                           generators)
        if out.logprobs is not None:
            lists = (None, None) if out.top_ids is None else (out.top_values.tolist(), out.top_ids.tolist())
            out.top_logprobs = top_logprob_lists(params, *lists)
        return out
