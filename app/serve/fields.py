"""Reading a request body: bounded JSON, typed fields, and sampling values checked by the settings table.

The sampling rules are the settings table's (app.runtime.settings), the same that flags, config.toml and /set obey: a
temperature the CLI refuses, the server refuses too, with the same words. This module adds only what HTTP needs:
JSON that parses, fields of the right type, no unknown field silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from malhae.errors import UserError
from malhae.runtime.settings import Sampling, check
from malhae.serve.errors import ApiError

MAX_BODY = 8 << 20  # bytes: a full 4,096-token prompt as text or ids is well under 100 KB
MAX_STOP = 16
MAX_STOP_CHARS = 256

# sampling fields a request may carry, by setting name; a server request does not repeat-penalise unless asked
# (OpenAI clients expect none), the other defaults are the settings table's
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "frequency_penalty",
                   "presence_penalty", "seed")
SERVER_DEFAULTS = {"repeat_penalty": 1.0}


async def read_json(request, limit: int = MAX_BODY, *, array: bool = False) -> dict | list:
    """The body as a JSON object (`array`: an array, as POST /lora-adapters takes); too large (413), not JSON, or
    not of that kind (400) is an ApiError. Read once: the route's wrapper reads it first for `model` and
    `keep_alive` (app.serve.routes), and the handler gets the same object."""
    if getattr(request.state, "json", None) is not None:
        return request.state.json
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError("the body is not UTF-8 text", code="invalid_json") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(f"the body is not valid JSON ({e})" if raw.strip() else "the body is empty; send a JSON "
                       + ("array" if array else "object"), code="invalid_json") from None
    if not isinstance(data, list if array else dict):
        raise ApiError(f"the body must be a JSON {'array' if array else 'object'}, not {kind(data)}",
                       code="invalid_json")
    return data


def _too_large(limit: int) -> ApiError:
    return ApiError(f"the body is larger than {limit // (1 << 20)} MiB", 413, code="body_too_large")


def kind(value: object) -> str:
    """A JSON value's type as a message names it."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


class Body:
    """A request object whose fields are read by name and type; a field no reader knows is refused, since a silently
    ignored `logit_bias` or `tools` would give an answer that looks right and is not."""

    def __init__(self, data: dict, known: Iterable[str], ignored: Iterable[str] = ()) -> None:
        self.data = data
        unknown = sorted(set(data) - set(known) - set(ignored))
        if unknown:
            raise ApiError(f"unknown field {unknown[0]!r}; this server does not support it", param=unknown[0],
                           code="unknown_field")

    def get(self, name: str, kinds: tuple[type, ...], default: object = None, what: str = "") -> object:
        value = self.data.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ApiError(f"{name} must be {what or _names(kinds)}, not {kind(value)}", param=name,
                           code="invalid_type")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        return self.get(name, (bool,), default, "true or false")  # type: ignore[return-value]

    def integer(self, name: str, default: int | None = None, low: int | None = None, high: int | None = None
                ) -> int | None:
        value = self.get(name, (int,), default, "a whole number")
        if value is not None and (low is not None and value < low or high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise ApiError(f"{name} must be {span}, not {value}", param=name, code="invalid_value")
        return value  # type: ignore[return-value]

    def forbid(self, name: str, allowed: Iterable[object], why: str) -> None:
        """A field this server does not implement, accepted only with a value that changes nothing."""
        value = self.data.get(name)
        if value is not None and value not in list(allowed):
            raise ApiError(f"{name} is not supported by this server ({why})", param=name, code="unsupported")


def _names(kinds: tuple[type, ...]) -> str:
    words = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "an array",
             dict: "an object"}
    return " or ".join(dict.fromkeys(words[k] for k in kinds))


def stops(value: object, name: str = "stop") -> tuple[str, ...]:
    """`stop`: a string or a list of strings, each non-empty; bounded in count and length."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(f"{name} must be a string or an array of strings", param=name, code="invalid_type")
    if len(items) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in items):
        raise ApiError(f"{name}: at most {MAX_STOP} stop texts of at most {MAX_STOP_CHARS} characters", param=name,
                       code="invalid_value")
    if any(not s for s in items):
        raise ApiError(f"{name}: a stop text cannot be empty", param=name, code="invalid_value")
    return tuple(items)


def sampling(values: dict[str, object], stop: tuple[str, ...] = (), names: dict[str, str] | None = None,
             defaults: dict[str, object] | None = None) -> Sampling:
    """A checked Sampling from request fields (`values` by setting name, None: not given); `names` maps a setting to
    the field the client wrote (Ollama's options use other words), for the message. A field not given takes the
    model's own default (`defaults`: `malhae models set`), else the server's."""
    names = names or {}
    defaults = defaults or {}
    given = {}
    for key in SAMPLING_FIELDS:
        value = values.get(key)
        if value is None:
            value = defaults.get(key, SERVER_DEFAULTS.get(key))
            if value is None:
                continue
        field = names.get(key, key)
        try:
            given[key] = check(key, value, where=f"{field} {json.dumps(value)}")
        except UserError as e:
            raise ApiError(str(e), param=field, code="invalid_value") from None
    return Sampling(**given, stop=stop)
