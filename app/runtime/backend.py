"""What chat, ask, complete and eval run on: a model on this machine (Engine) or on a server (RemoteBackend).

The front ends see only this interface, so a conversation, its template, its stop strings and its stats work the same
either way; which one runs is decided once, by `open_backend`, from the user's --endpoint (or MALHAE_ENDPOINT, or
config.toml's endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from malhae.runtime.endpoint import Endpoint
from malhae.runtime.engine import Stats
from malhae.runtime.settings import LoadOptions, Sampling


class Backend(Protocol):
    remote: bool
    n_ctx: int  # tokens one prompt and its answer may take
    stats: Stats  # of the last generate(), once it has ended

    @property
    def name(self) -> str: ...  # the model's name (a saved chat records it)

    @property
    def where(self) -> str: ...  # briefly, where it runs ("m.gguf, CPU"; "vLLM at http://…/v1")

    @property
    def location(self) -> str: ...  # in full

    def tokenize(self, text: str) -> list[int]: ...

    def check_fits(self, n_prompt: int) -> None: ...

    def chat_template_info(self) -> tuple[str | None, str, str]: ...  # (own chat template, BOS text, EOS text)

    def generate(self, prompt: str | list[int], sampling: Sampling | None = None, *,
                 messages: list[dict[str, str]] | None = None) -> Iterator[str]: ...

    def close(self) -> None: ...


def open_backend(options: LoadOptions, *, endpoint: Endpoint | None = None, model: str | None = None,
                 remote_chat: bool = False, notify: Callable[[str], None] | None = None) -> Backend:
    """`options.model` loaded here as `options` say (speculating with options.draft); or, with an `endpoint`, its
    model named `model` (None: its only one), which decodes as its server does: of `options` only ctx applies."""
    if endpoint is not None:
        from malhae.runtime.remote import RemoteBackend

        return RemoteBackend(endpoint, model, chat=remote_chat, n_ctx=options.ctx, notify=notify)
    from malhae.runtime.engine import Engine

    return Engine(options, notify=notify)
