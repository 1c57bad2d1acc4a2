"""From the scheduler's thread to an HTTP handler's event loop: the events of one request's jobs, as an async stream.

A request (n choices, several prompts) becomes several scheduler jobs submitted together; their events arrive on
the scheduler thread and are handed to the loop with call_soon_threadsafe. Leaving the `async with` for any reason
(the answer is complete, the client went away, the handler failed) cancels whatever still runs, so no slot is ever
left generating for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.runtime.batching import Busy, Done, Event, Job, Scheduler
from app.runtime.settings import Sampling
from app.serve.errors import ApiError, busy


class Request:
    """The jobs of one HTTP request; iterate `events()` for (job index, event) until every job is done."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.jobs: list[Job] = []
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def add(self, tokens: list[int], sampling: Sampling, max_new: int, *, logprobs: int | None = None,
            echo: bool = False) -> int:
        index = len(self.jobs)

        def emit(event: Event) -> None:  # on the scheduler thread
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

        self.jobs.append(Job(tokens, sampling, max_new, emit, logprobs=logprobs, echo=echo))
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

    async def events(self, disconnected=None) -> AsyncIterator[tuple[int, Event]]:
        """Every job's events in the order they happened; `disconnected()` (async) is polled while waiting, for
        handlers whose client could leave unnoticed (a non-streamed answer)."""
        left = len(self.jobs)
        while left:
            try:
                index, event = await asyncio.wait_for(self._queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    self.cancel()
                    return
                continue
            if isinstance(event, Done):
                left -= 1
                self.jobs[index].cancelled = True  # finished: nothing more to cancel
            yield index, event
