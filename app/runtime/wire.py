"""A remote server's answer, read field by field and never trusted: each field's type and range is checked.

A server is another program (llama-server, vLLM, a proxy, anything on the network that speaks HTTP), so a field may
hold anything. Read unchecked, a wrong one became an internal error far from its cause ("index": "zero" sorted next
to numbers), or worse, a plausible number (NaN log-probabilities made `perplexity nan`, exit 0). Here each field is
checked where it is read, and a malformed one is one line naming the server's route and the field.
"""

from __future__ import annotations

import math

from malhae.errors import UserError
from malhae.runtime.step import llama_server_stop_text

MAX_SERVER_CTX = 1 << 24  # a context a server may claim: far above any model's, far below a number that is no size
ROUNDING = 1e-4  # a log-probability this far above 0 is a server's rounding of 0, not an impossible value


def count(value: object) -> bool:
    """Whether a server's number is a count (usage fields of a server that is not malhae's may be anything)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def malformed(where: str, field: str, value: object) -> UserError:
    """`where` (the route's URL) answered with a `field` that the OpenAI API never puts there."""
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    return UserError(f"{where} answered with {field!r} = {shown}, which is not what an OpenAI-compatible API sends "
                     "there; check --endpoint")


def context_size(where: str, field: str, value: object) -> int | None:
    """A context size a server states (None or 0: it does not say): a count up to MAX_SERVER_CTX."""
    if value is None or value == 0:
        return None
    if not count(value) or value > MAX_SERVER_CTX:
        raise malformed(where, field, value)
    return value  # type: ignore[return-value]


def choice(where: str, value: object) -> tuple[str, str | None, object]:
    """(text, finish_reason, stop_reason) of one streamed choice: a chat delta's content or a completion's text;
    stop_reason is ... where the server does not say it (vLLM's is a stop text, or an end token's id)."""
    if not isinstance(value, dict):
        raise malformed(where, "choices", value)
    delta = value.get("delta")
    if delta is not None and not isinstance(delta, dict):
        raise malformed(where, "delta", delta)
    field, text = ("delta.content", delta.get("content")) if delta is not None else ("text", value.get("text"))
    finish = value.get("finish_reason")
    for name, got in ((field, text), ("finish_reason", finish)):
        if got is not None and not isinstance(got, str):
            raise malformed(where, name, got)
    return text or "", finish or None, value.get("stop_reason", ...) if finish else ...


def verbose_stop(where: str, verbose: object, matched: object) -> object:
    """What llama-server's last chunk (`__verbose`, asked for with "verbose": true) says ended the answer, as
    step.llama_server_stop_text reads it; `matched` where the chunk says nothing."""
    if not isinstance(verbose, dict) or verbose.get("stop") is not True:
        return matched
    for field in ("stop_type", "stopping_word"):
        if verbose.get(field) is not None and not isinstance(verbose.get(field), str):
            raise malformed(where, f"__verbose.{field}", verbose.get(field))
    return llama_server_stop_text(verbose, matched)


def in_order(where: str, choices: list, n: int) -> list:
    """The n choices of a batched request in the order of its prompts: by their `index` fields, which must then be
    0 … n-1 once each (without any, they come in order)."""
    indices = [c.get("index") if isinstance(c, dict) else None for c in choices]
    if all(i is None for i in indices):
        return choices
    if not all(count(i) for i in indices) or sorted(indices) != list(range(n)):
        raise malformed(where, "index", next((i for i in indices if not count(i) or i >= n), indices))
    return sorted(choices, key=lambda c: c["index"])


def logprob(server: str, value: object) -> float:
    """A log-probability as `server` returned it, if it can be one: a finite number ≤ 0 (p ≤ 1), give or take a
    rounding of 0. NaN or a positive value would otherwise pass into a score as a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{server} returned a log-probability that is not a number ({value!r:.40})")
    if not math.isfinite(value) or value > ROUNDING:
        raise UserError(f"{server} returned an impossible log-probability ({value!r}); a log-probability is a "
                        "finite number ≤ 0, so none of its scores can be trusted")
    return float(value)
