"""What a model's name runs, as one value: the file and how to load it, and what the name adds on top of a loaded
model (an adapter preset's LoRA, the model's own system text, template, sampling defaults and keep_alive).

`malhae serve` resolves each request's `model` to a Target (app.store.served for the store; `Pinned` here for one
model given with -m) and keeps loaded models by `key`, the model file's name, so that an adapter preset shares its
base's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from malhae.runtime.settings import LoadOptions, Lora

UNSET = object()  # a keep_alive nobody set: the server's default applies


@dataclass(frozen=True)
class Target:
    """What one name runs. `key` names the loaded model it shares (its file); `name` is what the client asked for."""

    name: str
    key: str
    options: LoadOptions  # model = the file; the server's flags with the model's own settings on top
    adapters: tuple[Lora, ...] = ()  # the preset's or the model's `lora`: each request runs with them
    sampling: dict[str, object] = field(default_factory=dict)  # the model's sampling defaults
    system: str | None = None
    template: str | None = None
    keep_alive: object = UNSET  # the model's own keep_alive (seconds, None for ever), else UNSET


@dataclass(frozen=True)
class Pinned:
    """One model under any name (`malhae serve -m`: as llama-server, since lm-eval and benchmark clients send
    whatever model name they were given)."""

    target: Target
    base: LoadOptions | None = None

    @property
    def pinned(self) -> str:
        return self.target.name

    def resolve(self, name: object) -> Target:
        return self.target

    def known(self) -> list[str]:
        return [self.target.name]
