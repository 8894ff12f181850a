"""Continuous batching: which requests run this step, and how many of their tokens.

Every step first gives each running request that is decoding its one token, preempting the
youngest running request (its blocks are freed; it is recomputed later) when the cache has no
room; then it spends what is left of the token budget on prefill, chunk by chunk, oldest request
first - so a long prompt never stalls the running decodes, and requests join and leave between steps.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..paged_cache import PagedKVCache
from .request import Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32              # requests running at once (and so in one step)
    max_num_batched_tokens: int = 2048  # tokens in one step (prefill chunks + decodes)
    max_model_len: int = 4096           # prompt + output per request

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class StepPlan:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: PagedKVCache):
        self.config, self.cache = config, cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []     # in admission order: the last is the youngest
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and give its blocks back."""
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.request_id)

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self.running.remove(request)
        self.cache.free(request.request_id)
        request.status, request.num_computed = Status.WAITING, 0
        self.num_preemptions += 1
        self.waiting.appendleft(request)  # first in line again: it was admitted before the others waiting
        plan.preempted.append(request)

    def schedule(self) -> StepPlan:
        plan = self._schedule()
        while not plan and len(self.running) > 1:  # running prefills hold each other's room: free the youngest
            preempted = plan.preempted
            self._preempt(self.running[-1], plan)  # (listed in `preempted`)
            plan = self._schedule()
            plan.preempted[:0] = preempted
        return plan

    def follow(self, preempted: list[str], scheduled: list[tuple[str, int, int]], requests: dict) -> StepPlan:
        """A tensor-parallel worker's plan: rank 0's, with the state changes `schedule` made there -
        its preemptions in order, then its admissions - so this rank's cache holds the same blocks.
        scheduled: (request id, tokens this step, num_computed after scheduling), which is checked."""
        plan = StepPlan()
        for request_id in preempted:
            self._preempt(requests[request_id], plan)
        for request_id, n, computed in scheduled:
            req = requests[request_id]
            if req.status is Status.WAITING:
                self._start(req, self.cache.find_cached(req.block_hashes, req.total_len))
            if req.num_computed != computed:
                raise RuntimeError(f"tensor-parallel worker out of step with rank 0: request {request_id} has "
                                   f"{req.num_computed} tokens cached here, {computed} there")
            plan.requests.append(req)
            plan.num_tokens.append(n)
        return plan

    def _start(self, req: Request, cached: list[int]) -> None:
        """A waiting request starts running, on what the prefix cache holds of it (`cached` blocks)."""
        self.cache.share(req.request_id, cached, req.total_len)
        req.num_computed = self.cache.seq_len(req.request_id)
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed
        self.waiting.remove(req)
        self.running.append(req)
        req.status = Status.RUNNING

    def _schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.config.max_num_batched_tokens
        reserved = 0  # blocks promised to requests already in the plan
        for req in [r for r in self.running if r.remaining == 1]:
            if req not in self.running:  # preempted below, for an older request
                continue
            while self.cache.blocks_needed(req.request_id, 1) > self.cache.num_free_blocks - reserved:
                victim = self.running[-1]
                if victim in plan.requests:  # never preempt what this step already runs
                    break
                self._preempt(victim, plan)
                if victim is req:
                    break
            if req not in self.running or len(plan.requests) >= self.config.max_num_seqs or budget < 1:
                continue
            if self.cache.blocks_needed(req.request_id, 1) > self.cache.num_free_blocks - reserved:
                continue  # no room even after preempting: it waits for a later step
            reserved += self.cache.blocks_needed(req.request_id, 1)
            plan.requests.append(req)
            plan.num_tokens.append(1)
            budget -= 1
        # Prefill: requests mid-prompt first (already running), then new or preempted ones, which
        # start on whatever the prefix cache holds of their sequence.
        candidates = [r for r in self.running if r.remaining > 1] + list(self.waiting)
        for req in candidates:
            if budget < 1 or len(plan.requests) >= self.config.max_num_seqs:
                break
            if req.status is Status.WAITING and len(self.running) >= self.config.max_num_seqs:
                break  # max_num_seqs bounds the running requests (each holds a row of the persistent batch)
            if not req.ready:
                continue  # its encoders are still running: those behind it may go first
            fresh = req.status is Status.WAITING and req.num_computed == 0
            cached = self.cache.find_cached(req.block_hashes, req.total_len) if fresh else []
            n = min(req.remaining - len(cached) * self.cache.block_size, budget)
            need = self.cache.blocks_needed(req.request_id, n, cached)
            if need > self.cache.num_free_blocks - reserved:
                break  # first come, first served: nobody overtakes a request waiting for room
            if fresh:
                self._start(req, cached)
            reserved += self.cache.blocks_needed(req.request_id, n)
            plan.requests.append(req)
            plan.num_tokens.append(n)
            budget -= n
        return plan
