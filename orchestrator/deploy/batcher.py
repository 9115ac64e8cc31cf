"""Dynamic batching on one Serve replica: concurrent requests for a model combined into the tuned
batch sizes (:func:`aitune.batching.run_rows` plans, pads and splits them back).

Ray Serve's ``@serve.batch`` waits its whole ``batch_wait_timeout_s`` unless the batch fills
(``wait_for_batch`` in ``ray/serve/batching.py``), so every request of a lone client pays the
delay. This queue waits only for requests that have already reached the replica and are being
read (``arriving``), for at most ``max_queue_delay_ms``; a lone request runs at once. While a batch
runs (on the replica's inference thread, so the event loop keeps reading requests), the next one
gathers. A request with more rows than the largest tuned size runs alone, split by the plan.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

#: the default queueing delay: how long a batch waits for requests already being read
DEFAULT_MAX_QUEUE_DELAY_MS = 2.0


@dataclass
class _Pending:
    item: Any
    rows: int
    future: asyncio.Future


class ModelBatcher:
    """One model's queue on one replica. ``run(items)`` returns one answer (or exception) per item."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_rows: int, max_queue_delay_ms: float,
                 call: Callable[..., Awaitable[Any]]) -> None:
        """``call(fn, *args)`` runs ``fn`` where the replica runs models (its inference thread)."""
        self.run, self.max_rows, self.delay_s = run, max(1, int(max_rows)), max(0.0, max_queue_delay_ms) / 1000.0
        self.call = call
        self._queue: list[_Pending] = []
        self._arriving = 0
        self._running = False
        self._joined: asyncio.Event | None = None
        #: batches run and rows in them (what ``status`` shows)
        self.batches, self.rows = 0, 0

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a request that has reached the replica for this model until it is queued or dropped."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(self, item: Any, rows: int) -> Any:
        """Queue one request's rows (call it inside :meth:`arriving`); its answer, or its exception raised."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, rows, future))
        self._arriving -= 1  # queued now; arriving() adds it back when the request leaves
        try:
            if self._joined is not None:
                self._joined.set()
            if not self._running:
                self._running = True
                asyncio.get_running_loop().create_task(self._drain())
            return await future
        finally:
            self._arriving += 1

    def _queued_rows(self) -> int:
        return sum(p.rows for p in self._queue)

    async def _gather(self) -> None:
        """Wait (at most the delay) for requests being read while the batch has room."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delay_s
        while self._arriving > 0 and self._queued_rows() < self.max_rows and loop.time() < deadline:
            self._joined = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._joined.wait(), deadline - loop.time())
        self._joined = None

    def _take(self) -> list[_Pending]:
        batch = [self._queue.pop(0)]
        rows = batch[0].rows
        while self._queue and rows + self._queue[0].rows <= self.max_rows:
            rows += self._queue[0].rows
            batch.append(self._queue.pop(0))
        return batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._gather()
                batch = self._take()
                try:
                    answers = await self.call(self.run, [p.item for p in batch])
                except Exception as exc:  # the whole batch failed: every request in it hears why
                    answers = [exc] * len(batch)
                self.batches += 1
                self.rows += sum(p.rows for p in batch)
                for pending, answer in zip(batch, answers):
                    if pending.future.done():  # its client went away
                        continue
                    if isinstance(answer, BaseException):
                        pending.future.set_exception(answer)
                    else:
                        pending.future.set_result(answer)
        finally:
            self._running = False
