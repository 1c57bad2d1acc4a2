"""From the scheduler's thread to an HTTP handler's event loop: the events of one request's jobs, as an async stream.

A request (n choices, several prompts) becomes several scheduler jobs submitted together; their events arrive on
the scheduler thread. Waking the event loop costs a system call and a context switch, and at hundreds of tokens a
second per stream that is what a Python server spends its time on (measured: the loop's share of the CPU beside a
tiny model's decode), so events go through one Dispatcher per loop: the scheduler thread appends to a deque and wakes
the loop only if no drain is pending; one step's tokens for all eight streams cost one wake-up, not eight.

Whatever ends a request (the answer is complete, the client went away, the handler failed) must end in `cancel()`,
so no slot is ever left generating for nobody.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import AsyncIterator

from malhae.runtime.batching import Busy, Scheduler
from malhae.runtime.events import Done, Event, Job
from malhae.runtime.settings import Lora, Sampling
from malhae.serve.errors import ApiError, busy

DISCONNECT_POLL = 0.5  # seconds between looks at a non-streamed request's connection


class Dispatcher:
    """Hands events from any thread to queues of one event loop, with at most one wake-up pending."""

    _by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a test's servers come and go

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: collections.deque[tuple[asyncio.Queue, object]] = collections.deque()
        self.scheduled = False
        self.requests: weakref.WeakSet[Request] = weakref.WeakSet()  # the ones being answered, for stop_all

    def stop_all(self) -> None:
        """The server is stopping: every request ends now (its jobs cancelled, its answer closed with a 'shutting
        down' error), instead of being cut off by uvicorn's timeout with a traceback."""
        for request in list(self.requests):
            request.stop()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Dispatcher:
        found = cls._by_loop.get(loop)
        if found is None:
            found = cls._by_loop[loop] = cls(loop)
        return found

    def put(self, queue: asyncio.Queue, item: object) -> None:
        """From the scheduler thread. Append first, then schedule: a drain that has already cleared the flag either
        sees the item or another drain is scheduled, so nothing waits unseen."""
        self.pending.append((queue, item))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.scheduled = False
        pending = self.pending
        while pending:
            queue, item = pending.popleft()
            queue.put_nowait(item)


class Request:
    """The jobs of one HTTP request; iterate `events()` for (job index, event) until every job is done."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.jobs: list[Job] = []
        self._queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()
        self._dispatch = Dispatcher.of(asyncio.get_running_loop())
        self._dispatch.requests.add(self)
        self.stopped = False

    def add(self, tokens: list[int], sampling: Sampling, max_new: int, *, logprobs: int | None = None,
            echo: bool = False, min_new: int = 0, adapters: tuple[Lora, ...] | None = None) -> int:
        index = len(self.jobs)
        put, queue = self._dispatch.put, self._queue

        def emit(event: Event) -> None:  # on the scheduler thread
            put(queue, (index, event))

        self.jobs.append(Job(tokens, sampling, max_new, emit, logprobs=logprobs, echo=echo, min_new=min_new,
                             adapters=adapters))
        return index

    def submit(self) -> None:
        """Queue every job (all or none: 503 when the queue cannot take them); the caller must `cancel()` in the
        end, or hand the request to a JobStream that does."""
        most = len(self.scheduler.slots) + self.scheduler.queue_limit
        if len(self.jobs) > most:  # would be refused however long the client waited: not a 503
            raise ApiError(f"{len(self.jobs)} sequences (prompts × n) in one request; this server takes at most "
                           f"{most} at once (--parallel + --queue)", code="too_many_prompts")
        try:
            self.scheduler.submit(self.jobs)
        except Busy as e:
            raise busy(str(e)) from None

    def cancel(self) -> None:
        running = [job for job in self.jobs if not job.cancelled]
        for job in running:
            job.cancel()
        if running:
            self.scheduler.wake()

    def stop(self) -> None:
        """End `events()` at once (on the loop's thread): the server is shutting down."""
        self.stopped = True
        self.cancel()
        self._queue.put_nowait(None)

    async def _watch(self, disconnected) -> None:
        while not await disconnected():
            await asyncio.sleep(DISCONNECT_POLL)
        self.cancel()
        self._queue.put_nowait(None)  # ends events(): nobody is there to answer

    async def events(self, disconnected=None) -> AsyncIterator[tuple[int, Event]]:
        """Every job's events in the order they happened; `disconnected()` (async) is watched meanwhile, for
        handlers whose client could leave unnoticed (a non-streamed answer; a stream has its own listener)."""
        watcher = asyncio.ensure_future(self._watch(disconnected)) if disconnected is not None else None
        try:
            left = len(self.jobs)
            while left:
                item = await self._queue.get()
                if item is None:
                    return
                index, event = item
                if isinstance(event, Done):
                    left -= 1
                    self.jobs[index].cancelled = True  # finished: nothing more to cancel
                yield index, event
        finally:
            if watcher is not None:
                watcher.cancel()
