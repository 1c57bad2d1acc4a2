"""LoRA adapters in the store: which of its models each one belongs to, for `malhae models`, `info` and `models rm`.

An adapter GGUF (general.type = adapter) lies in the store beside the models, so that `--lora NAME` finds it the way
`-m NAME` finds a model; but it is never a model. Its base is what its adapter_config.json said
(base_model_name_or_path: a hub id such as EleutherAI/polyglot-ko-12.8b, or the folder it was trained from), which
the converter keeps as general.base_model.0.name. A store model is its base when the model's source (the hub id or
folder it was converted from), its name or its file's name holds the same last name (app.runtime.lora.other_base),
and the adapter's tensors fit the model's (the shapes llama.cpp checks): a 4-bit QLoRA's base is then each
quantization of that model in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from malhae.errors import UserError
from malhae.runtime.gguf_info import read_info
from malhae.runtime.lora import AdapterInfo, other_base
from malhae.store.local import Entry


def fits(adapter: Entry, model: Entry) -> bool:
    """Whether the adapter's tensors fit the model's (headers only)."""
    try:
        AdapterInfo.read(adapter.path).check_fits(read_info(model.path))
    except UserError:
        return False
    return True


def bases(adapter: Entry, models: list[Entry]) -> list[Entry]:
    """The models among `models` that the adapter was trained on (see the module's docstring)."""
    if not adapter.base or adapter.error:
        return []
    named = [m for m in models if not m.error and not m.adapter
             and not other_base(adapter.base, [m.source, m.name, m.path.name])]
    return [m for m in named if fits(adapter, m)]


@dataclass
class Listing:
    """The store as `malhae models` shows it: the models, each adapter under every model it belongs to, and the
    adapters whose base is not there (listed apart, with their base's name)."""

    models: list[Entry]
    under: dict[str, list[Entry]] = field(default_factory=dict)  # model name → its adapters
    apart: list[Entry] = field(default_factory=list)

    def bases_of(self, adapter: Entry) -> list[str]:
        return [name for name, found in self.under.items() if adapter in found]


def arrange(entries: list[Entry]) -> Listing:
    models = [e for e in entries if not e.adapter]
    listing = Listing(models)
    for adapter in (e for e in entries if e.adapter):
        found = bases(adapter, models)
        for model in found:
            listing.under.setdefault(model.name, []).append(adapter)
        if not found:
            listing.apart.append(adapter)
    return listing


def orphaned(removed: Entry, entries: list[Entry]) -> list[Entry]:
    """The adapters whose only base in the store is `removed` (computed before it goes)."""
    if removed.adapter:
        return []
    listing = arrange(entries)
    return [a for a in listing.under.get(removed.name, []) if listing.bases_of(a) == [removed.name]]


def base_of(adapter: Entry) -> Entry | None:
    """The model an adapter preset runs on (`malhae serve` serves an adapter's name): the first of its bases in
    `malhae models`' order, the bundled demo's included; None when the store has none."""
    from malhae.store import models
    from malhae.store.local import open_store

    entries = [e for e in open_store().entries() if not e.adapter]
    found = bases(adapter, entries + models.builtin_entries([e.name for e in entries]))
    return found[0] if found else None
