"""One line on stderr per request, as Ollama's server writes them: when, status, how long, who, what.

    [malhae] 2026/12/07 - 08:01:02 | 200 |   41.52ms | 127.0.0.1 | POST "/v1/chat/completions"

The line is written when the answer has been sent (a stream: when it ended), so the duration is the client's wait.
Everything the client chose (the path, the method) is written with control and other unprintable characters escaped:
a path with "\\n[malhae] … | 200 |" in it must not forge a line of its own, nor a terminal escape recolour the log.
499 (nginx's word) is a client that went away before its answer could be sent. `malhae serve --quiet` turns it off.
"""

from __future__ import annotations

import sys
import time

MAX_PATH = 500  # characters of a path written (a request line may be 64 KiB)


def escaped(text: str, limit: int = MAX_PATH) -> str:
    """`text` with every unprintable character (controls, line breaks, bidi overrides) as a \\x, \\u escape: unlike
    app.ui.printable, which drops them from what a user reads, a log keeps what the client sent, visibly."""
    out = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[:limit] + "…"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.2f}ms" if seconds < 1 else f"{seconds:.3f}s"


def line(status: int | None, seconds: float, client: str, method: str, path: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y/%m/%d - %H:%M:%S", time.localtime(when))
    shown = "-" if status is None else str(status)
    return (f"[malhae] {stamp} | {shown:>3} | {_duration(seconds):>10} | {escaped(client, 64):>15} | "
            f'{escaped(method, 16)} "{escaped(path)}"')


class AccessLog:
    """ASGI middleware, outermost, so that refused requests (Host, Origin, API key) are logged too."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500  # uvicorn answers 500 for an exception that left the application
            raise
        finally:
            client = scope.get("client")
            text = line(status, time.perf_counter() - started, client[0] if client else "-", scope.get("method", ""),
                        scope.get("path", ""))
            try:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed or gone: the request is not failed for its log line
                pass
