"""A streamed response tied to its jobs: whatever ends the response (the last event, the client leaving, an error
while sending) cancels the jobs that still run, and a client that leaves is noticed even while nothing is sent (a
long prompt being evaluated), by listening for its disconnect beside the stream."""

from __future__ import annotations

import contextlib

import anyio
from starlette.responses import StreamingResponse

from malhae.serve.jobs import Request


class JobStream(StreamingResponse):
    def __init__(self, request: Request, events, media_type: str = "text/event-stream") -> None:
        super().__init__(events, media_type=media_type, headers={"Cache-Control": "no-cache",
                                                                 "X-Accel-Buffering": "no"})
        self.jobs = request
        self.ended: list = []  # called once the response is over (app.serve.routes: the request's lease on its model)

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client closed the connection while we sent
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def listen() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(listen)
        finally:
            self.jobs.cancel()
            for end in self.ended:
                end()
