"""Talking to a running `malhae serve` from another terminal: `malhae ps` (what it has loaded) and `malhae stop NAME`
(unload one now), over its Ollama routes, as `ollama ps` and `ollama stop` do.

The standard library's urllib only, so that these commands work on the base install (the serve extra is for the
server, not for asking it). No proxy from the environment (a server on 127.0.0.1 reached through $http_proxy is a
failure that names the proxy, not the server) and no redirect (urllib would carry the API key to wherever it points).
Every failure is one line naming the URL: nothing listening, a key refused, the server's own error message (its
control characters removed: the server chose that text), an answer that is not a malhae server's JSON.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from malhae.errors import UserError
from malhae.files import parse_json
from malhae.runtime import endpoint
from malhae.ui import printable

DEFAULT_URL = "http://127.0.0.1:8080"
PS_TIMEOUT = 5.0  # listing is instant on a server that is up
STOP_TIMEOUT = 60.0  # unloading may wait for the model's requests in progress to end
MAX_ANSWER = 4 << 20  # /api/ps for a store's worth of models is a few KB
MAX_ERROR = 64 << 10
SERVER_FAILED = 1  # the server answered with its own error (a 404 for a model it has not loaded, a 500): not a typo
EXAMPLE = "e.g. --url http://127.0.0.1:8080"


def server_url(flag: str | None) -> str:
    """The server's root URL: --url, else $MALHAE_ENDPOINT (the OpenAI base URL other commands take, so its /v1 is
    dropped), else malhae serve's default address. `host:port` alone means http://host:port."""
    env = os.environ.get("MALHAE_ENDPOINT", "").strip()
    given, where = (flag, f"--url {flag!r}") if flag is not None else (env, f"MALHAE_ENDPOINT={env!r}")
    if flag is None and not env:
        return DEFAULT_URL
    parts = endpoint.split_url(given, where, "the server's address", EXAMPLE)
    path = parts.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc}{path.rstrip('/')}"


def api_key() -> str | None:
    """$MALHAE_API_KEY, the key `malhae serve` reads too; empty means none."""
    key = os.environ.get("MALHAE_API_KEY", "").strip()
    if any(c in key for c in "\r\n"):
        raise UserError("MALHAE_API_KEY spans lines; set it to the server's key alone")
    return key or None


def ps(url: str) -> list[dict]:
    """The models the server has loaded (or is loading), as /api/ps lists them."""
    answer = _call(url, "/api/ps", None, PS_TIMEOUT, "listing its models")
    models = answer.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str)
                                               for m in models):
        raise _not_malhae(url, 'no "models" list of named models in its /api/ps answer')
    return models


def stop(url: str, name: str) -> bool:
    """Unload `name` now: exactly what `ollama stop` sends (a generate request with keep_alive 0 and no prompt),
    which the server answers with {"done": true, "done_reason": "unload"}; False when malhae's server says it was
    not loaded (its `loaded` field; other servers do not say, and count as True)."""
    if not name.strip():
        raise UserError("give the name of a loaded model, as `malhae ps` lists it, e.g. malhae stop demo")
    answer = _call(url, "/api/generate", {"model": name, "keep_alive": 0}, STOP_TIMEOUT, f"stopping {name}")
    if answer.get("done") is not True:
        raise _not_malhae(url, 'its /api/generate answer to keep_alive 0 is not "done"')
    return answer.get("loaded") is not False


# --- one request --------------------------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx itself comes back as an HTTPError


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _call(url: str, path: str, body: dict | None, timeout: float, what: str) -> dict:
    """One request and its JSON object; every failure a one-line UserError that says what was being done."""
    headers = {"Accept": "application/json", "User-Agent": "malhae"}
    data = None
    if body is not None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json"
    key = api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            raw = resp.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as e:
        with e:
            raise _refused(url, e, key, what) from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError; ValueError: a bad host
        raise _unreachable(url, e, timeout) from None
    if len(raw) > MAX_ANSWER:
        raise _not_malhae(url, f"an answer of more than {MAX_ANSWER >> 20} MiB")
    try:
        value = parse_json(raw, "the answer")
    except UserError:
        value = None
    if not isinstance(value, dict):
        raise _not_malhae(url, f"not a JSON object: {_preview(raw)}")
    if value.get("error"):
        raise UserError(f"{what} failed: the server at {url} said: {endpoint.error_message(value)}",
                        exit_code=SERVER_FAILED)
    return value


def _unreachable(url: str, e: Exception, timeout: float) -> UserError:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, socket.gaierror):
        host = urlsplit(url).hostname
        return UserError(f"cannot find host {host!r} ({url}): {reason.strerror or reason}; check --url or "
                         "MALHAE_ENDPOINT")
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return UserError(f"no answer from {url} within {timeout:g} s; the server is busy or stalled, or it is not a "
                         "malhae server: check --url")
    if isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError, http.client.HTTPException)):
        return _not_malhae(url, "it closed the connection without an HTTP answer")
    if isinstance(reason, OSError):  # refused, no route, network down: nothing there to talk to
        return UserError(f"no malhae server answers at {url}; start one with `malhae serve`, or give its address "
                         "with --url")
    return UserError(f"talking to {url} failed: {type(reason).__name__}: {printable(str(reason))}")


def _refused(url: str, e: urllib.error.HTTPError, key: str | None, what: str) -> UserError:
    try:
        raw = e.read(MAX_ERROR)
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        message = endpoint.error_message(parse_json(raw, "the error"))
    except UserError:
        message = ""
    said = f": {message}" if message else f" ({_preview(raw)})" if raw.strip() else ""
    if e.code == 401:
        fix = "MALHAE_API_KEY holds another key than the server's --api-key" if key else \
            "it needs the key it was started with: set MALHAE_API_KEY"
        return UserError(f"the server at {url} refused the request (401){said}; {fix}")
    if 300 <= e.code < 400:
        return _not_malhae(url, f"it redirects ({e.code}) to {printable(e.headers.get('Location') or '?')}")
    if not message:
        return UserError(f"{what} failed: {url} answered {e.code}{said}; is it a malhae server? check --url",
                         exit_code=SERVER_FAILED)
    return UserError(f"{what} failed: the server at {url} answered {e.code}{said}", exit_code=SERVER_FAILED)


def _not_malhae(url: str, what: str) -> UserError:
    return UserError(f"{url} did not answer like a malhae server ({what}); check --url (the address `malhae serve` "
                     f"printed, {EXAMPLE})")


def _preview(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return f"got {endpoint.short(text, 60)!r}" if text else "an empty answer"


