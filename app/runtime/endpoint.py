"""HTTP to an OpenAI-compatible server: one request, its JSON or its SSE stream, and every network failure as one line.

Python's own http.client rather than the `openai` package: the base install can then reach a server with no extra,
and every failure a network brings (refused, no such host, a stall, a key refused, a stream cut off) is caught where
it happens and said with the URL — the openai client's retries (which would repeat a generation silently) and its
tolerance of non-OpenAI answers are exactly what must not happen here. A new connection per request: closing it is
how a stopped answer tells the server to stop (it sees the disconnect), and on a LAN the handshake costs nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from malhae.errors import UserError
from malhae.files import parse_json
from malhae.ui import printable

DEFAULT_TIMEOUT = 120.0  # seconds without a byte: a busy server may queue a request, and a long prompt takes time
MAX_TIMEOUT = 86400.0
CONNECT_TIMEOUT = 10.0  # a server that is up accepts at once
MAX_JSON = 256 << 20  # an answer with the prompt's log-probabilities for a batch of long prompts is a few MB
MAX_LINE = 16 << 20  # one SSE line: one chunk of an answer


class HttpError(UserError):
    """The server answered with an HTTP error; `status` says which, for a caller that has a way around it (a 404
    for an optional route)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_timeout(value: float | None, where: str = "--timeout") -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.1 <= value <= MAX_TIMEOUT:
        raise UserError(f"{where} {value}: give seconds from 0.1 to {MAX_TIMEOUT:g} (default {DEFAULT_TIMEOUT:g})")
    return float(value)


def split_url(url: str, where: str, what: str, example: str):
    """A server's URL as a user types it (`host:port` alone is http://host:port), checked: http or https, a host, a
    numeric port, no query or fragment; else a one-line UserError naming `where` with `example`. Used for
    --endpoint and `malhae ps --url`."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as e:
        raise UserError(f"{where} is not a URL ({e}); give {what}, {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{where}: give an http:// or https:// URL with a host, {example}")
    if parts.query or parts.fragment:
        raise UserError(f"{where}: give {what} without ?query or #fragment, {example}")
    return parts


@dataclass(frozen=True)
class Endpoint:
    """Where the API is (its base URL, which ends in /v1 for every server malhae knows) and how to talk to it."""

    url: str
    api_key: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def parse(cls, url: str, api_key: str | None = None, timeout: float | None = None) -> Endpoint:
        """A base URL as a user types it: `http://host:8000/v1`; a URL without a path gets /v1 (every server malhae
        knows serves the API there)."""
        parts = split_url(url, f"--endpoint {url!r}", "the API's base URL", "e.g. http://127.0.0.1:8080/v1")
        path = parts.path.rstrip("/") or "/v1"
        if api_key is not None and (not api_key.strip() or any(c in api_key for c in "\r\n")):
            raise UserError("the API key is empty or spans lines; give it with --api-key or MALHAE_API_KEY")
        return cls(f"{parts.scheme}://{parts.netloc}{path}", api_key or None, check_timeout(timeout))

    @property
    def root(self) -> str:
        """scheme://host:port: where servers put their own routes (/tokenize, /props, /health)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    # --- requests --------------------------------------------------------------------------------------------

    def get(self, path: str, *, root: bool = False) -> dict:
        return self.call("GET", path, None, root=root)

    def post(self, path: str, body: dict, *, root: bool = False) -> dict:
        return self.call("POST", path, body, root=root)

    def call(self, method: str, path: str, body: dict | None, *, root: bool = False) -> dict:
        """One request and its JSON object; any HTTP error or non-JSON answer is a UserError naming the URL."""
        with Exchange(self, method, path, body, root=root) as ex:
            return ex.json()

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The events of a streamed answer (SSE `data:` lines) as JSON objects, until `[DONE]`. Closing the
        generator closes the connection, which is how the server learns the answer is no longer wanted."""
        with Exchange(self, "POST", path, body) as ex:
            yield from ex.events()


class Exchange:
    """One HTTP request on its own connection, with the failures of each step turned into one-line errors."""

    def __init__(self, endpoint: Endpoint, method: str, path: str, body: dict | None, *, root: bool = False) -> None:
        self.endpoint = endpoint
        base = endpoint.root if root else endpoint.url
        self.url = base + path
        parts = urlsplit(self.url)
        self.host = parts.hostname or ""
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.conn = kind(parts.hostname, parts.port, timeout=min(CONNECT_TIMEOUT, endpoint.timeout))
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "malhae"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        try:
            self.conn.connect()
            self.conn.sock.settimeout(endpoint.timeout)
            self.conn.request(method, parts.path or "/", body=data, headers=headers)
            self.resp = self.conn.getresponse()
        except BaseException as e:
            self.close()
            if isinstance(e, Exception):
                raise self.failed(e) from None
            raise
        if not 200 <= self.resp.status < 300:
            try:
                raise self.refused()
            finally:
                self.close()

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket at once (not only our end of the stream): the server sees the client gone."""
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()

    # --- what came back --------------------------------------------------------------------------------------

    def json(self) -> dict:
        try:
            data = self.resp.read(MAX_JSON + 1)
        except Exception as e:
            raise self.failed(e) from None
        if len(data) > MAX_JSON:
            raise UserError(f"{self.url} answered with more than {MAX_JSON >> 20} MB; that is not an API answer")
        return self.parse(data)

    def parse(self, data: bytes) -> dict:
        value = _json_or_none(data)
        if not isinstance(value, dict):
            raise self.not_openai(f"got {_preview(data)}")
        if "error" in value and value["error"]:  # a stream's error event, or a 200 that is an error (some proxies)
            raise UserError(f"the server at {self.endpoint.url} failed: {error_message(value)}")
        return value

    def events(self) -> Iterator[dict]:
        """SSE as the OpenAI API streams it: `data: {json}` lines, blank lines between events, `data: [DONE]` last."""
        kind = self.resp.getheader("Content-Type", "")
        if "text/event-stream" not in kind:
            if "json" in kind:  # a server that ignored stream: true answered whole; nothing to stream
                raise self.not_openai("it answered a streamed request with one JSON object")
            raise self.not_openai(f"got {kind or 'no content type'} instead of an event stream")
        while True:
            try:
                line = self.resp.readline(MAX_LINE + 1)
            except Exception as e:
                raise self.cut(e) from None
            if not line:
                raise self.cut(None)
            if len(line) > MAX_LINE:
                raise UserError(f"{self.url} sent a stream line of more than {MAX_LINE >> 20} MB")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank lines, `: comments`, `event:` and `id:` lines
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield self.parse(data)

    # --- failures --------------------------------------------------------------------------------------------

    def failed(self, e: Exception) -> UserError:
        url, t = self.endpoint.url, self.endpoint.timeout
        if isinstance(e, socket.gaierror):
            return UserError(f"cannot find host {self.host!r} ({url}): {e.strerror or e}; check the --endpoint "
                             "address")
        if isinstance(e, ConnectionRefusedError):
            return UserError(f"cannot connect to {url}: connection refused; is the server running there? "
                             "(`malhae serve` starts one)")
        if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
            return UserError(f"no answer from {self.url} within {t:g} s (timeout); the server may be busy or "
                             "stalled; --timeout SECONDS waits longer")
        if isinstance(e, ssl.SSLError):
            return UserError(f"TLS with {url} failed: {e.reason or e}; check the URL (http:// or https://)")
        if isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return UserError(f"{url} closed the connection without answering; is it an HTTP API (the right port)?")
        if isinstance(e, http.client.HTTPException):
            return self.not_openai(f"not HTTP ({type(e).__name__})")
        if isinstance(e, OSError):
            return UserError(f"cannot reach {url}: {e.strerror or e}")
        return UserError(f"talking to {url} failed: {type(e).__name__}: {e}")

    def cut(self, e: Exception | None) -> UserError:
        if isinstance(e, TimeoutError):
            return UserError(f"the answer from {self.url} stopped: nothing for {self.endpoint.timeout:g} s "
                             "(timeout); --timeout SECONDS waits longer")
        return UserError(f"the answer from {self.endpoint.url} was cut off: the server closed the connection "
                         "in the middle of the stream")

    def not_openai(self, what: str) -> UserError:
        return UserError(f"{self.url} did not answer like an OpenAI-compatible API ({what}); check --endpoint "
                         "(the API's base URL, e.g. http://127.0.0.1:8080/v1)")

    def refused(self) -> HttpError:
        return HttpError(self._refusal(self.resp.status), self.resp.status)

    def _refusal(self, status: int) -> str:
        try:
            data = self.resp.read(1 << 20)
        except Exception:
            data = b""
        message = error_message(_json_or_none(data)) or short(data.decode("utf-8", "replace"), 120)
        said = f": {message}" if message else ""
        url = self.endpoint.url
        if status in (401, 403):
            fix = ("give the right key with --api-key or MALHAE_API_KEY" if self.endpoint.api_key else
                   "it needs an API key: give it with --api-key or MALHAE_API_KEY")
            return (f"the server at {url} refused the request ({status}){said}; {fix}")
        if status == 404:
            if not self.url.endswith("/models") and re.search(r"\bmodel\b", message, re.IGNORECASE):
                return (f"the server at {url} has no such model (404){said}; see its models with "
                                 "/model in chat or the server's /v1/models")
            return (f"{self.url} does not exist (404){said}; is --endpoint the API's base URL? It usually "
                             "ends in /v1")
        if status in (429, 503):
            return (f"the server at {url} is busy ({status}){said}; try again later")
        if status >= 500:
            return (f"the server at {url} failed ({status}){said}")
        return (f"the server at {url} refused the request ({status}){said}")


def _json_or_none(data: bytes) -> object:
    """A server's body as JSON (files.parse_json's bounds: nesting, integers, characters), or None."""
    try:
        return parse_json(data, "the answer")
    except UserError:
        return None


def error_message(value: object) -> str:
    """The error text of OpenAI's {"error": {"message"}}, vLLM's {"message"}, Ollama's {"error": "…"} or
    {"detail": …}, as one short line (`short`): for every client of a server, `malhae ps` and `stop` too."""
    if not isinstance(value, dict):
        return ""
    error = value.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    for text in (error, value.get("message"), value.get("detail")):
        if isinstance(text, str) and text.strip():
            return short(text)
        if text is not None and not isinstance(text, str):
            return short(json.dumps(text, ensure_ascii=False))
    return ""


def _preview(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return repr(short(text, 60)) if text else "an empty answer"


def short(text: str, limit: int = 300) -> str:
    """A server's text as one short line with no control character: it goes into an error message, which chat, a
    log or a caller's own printer may show as it is."""
    line = " ".join(printable(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"
