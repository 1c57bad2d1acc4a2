"""Errors a client caused, as OpenAI's error body: `{"error": {"message", "type", "code", "param"}}` and a 4xx status.

One exception type for every bad request, raised wherever the problem is found (JSON, a field, the context) and
turned into a response in one place, so that nothing a client sends reaches the scheduler unchecked or leaves as a
traceback.
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, *, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}


def busy(message: str) -> ApiError:
    """Every slot is busy and the queue is full: 503 with Retry-After, which OpenAI's clients honour by retrying."""
    return ApiError(f"the server is busy: {message}; retry shortly", 503, code="server_busy", kind="server_error",
                    headers={"Retry-After": "1"})


def shutting_down() -> ApiError:
    return ApiError("the server is shutting down; retry once it is back", 503, code="shutting_down",
                    kind="server_error", headers={"Retry-After": "5"})
