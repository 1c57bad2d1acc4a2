"""What chat, ask, complete and eval run on: a model on this machine (Engine) or on a server (RemoteBackend).

The front ends see only this interface, so a conversation, its template, its stop strings and its stats work the same
either way; which one runs is decided once, by `open_backend`, from the user's --endpoint (or MALHAE_ENDPOINT, or
config.toml's endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from app.runtime.endpoint import Endpoint
from app.runtime.engine import Stats
from app.runtime.settings import Sampling


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


def open_backend(target: Path | Endpoint, *, model: str | None = None, remote_chat: bool = False,
                 n_ctx: int | None = None, threads: int | None = None, gpu_layers: str | int | None = "auto",
                 verbose: bool = False, notify: Callable[[str], None] | None = None, draft: str | Path | None = None,
                 draft_max: int | None = None, device: str | None = None) -> Backend:
    """A GGUF file is loaded here (speculating with `draft`); an Endpoint is asked for `model` (None: its only one),
    and decodes as its server does."""
    if isinstance(target, Endpoint):
        from app.runtime.remote import RemoteBackend

        return RemoteBackend(target, model, chat=remote_chat, n_ctx=n_ctx, notify=notify)
    from app.runtime.engine import Engine
    from app.runtime.settings import DEFAULT_DRAFT_MAX

    return Engine(target, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, verbose=verbose, notify=notify,
                  draft=draft, draft_max=draft_max or DEFAULT_DRAFT_MAX, device=device)
