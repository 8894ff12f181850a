"""asyncio front end of the engine: many concurrent streams, one step loop.

Steps run in a worker thread (the event loop stays free to serve); adding and aborting requests
take the same lock as a step, so the engine is only ever touched by one party at a time.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .engine import Engine
from .request import RequestOutput


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task | None = None

    async def stream(self, prompt=None, params=None, **kwargs) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one request. Bad input raises here, before anything is queued;
        leaving the iterator early (or cancelling the task) aborts the request and frees its blocks."""
        async with self._lock:
            rid = self.engine.add_request(prompt, params, **kwargs)
            queue = self._queues[rid] = asyncio.Queue()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        async with self._lock:
            self.engine.abort(request_id)
            self._queues.pop(request_id, None)

    async def _run(self) -> None:
        while self._queues:
            try:
                async with self._lock:
                    outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # noqa: BLE001 - a failed step must end the streams it carries, not hang them
                await self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                return
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._queues[out.request_id]
            await asyncio.sleep(0)  # let consumers and new requests in between steps

    async def _fail_all(self, error: str) -> None:
        async with self._lock:
            for rid, queue in list(self._queues.items()):
                self.engine.abort(rid)
                queue.put_nowait(RequestOutput(rid, "", [], True, "error", error=error))
            self._queues.clear()
