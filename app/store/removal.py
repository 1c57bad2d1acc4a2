"""Removing a model from the store, and what goes with it: its own settings file, the default if it was the default,
and the adapters left without a base (said, not removed). One rule for `malhae models rm` and a server's
`DELETE /api/delete`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from malhae.errors import NotFound
from malhae.store.local import Entry, Store


@dataclass
class Removal:
    entry: Entry
    orphans: list[Entry] = field(default_factory=list)  # adapters whose only base it was
    settings_file: Path | None = None  # its settings (app.store.model_settings), removed with it
    default_in: Path | None = None  # the settings file whose default_model it was (now unset)


def find(store: Store, name: str) -> Entry:
    """The store's entry of that name; the bundled demo (nothing to remove) and unknown names are NotFound."""
    from malhae.store import models

    entry = store.get(name)
    if entry is None:
        if models.builtin(name) is not None:
            raise NotFound(f"'{name.strip()}' is the bundled demo model, built in to malhae, not a file in the store: "
                           "there is nothing to remove")
        error = store.not_found(name, removing=True)
        raise NotFound(str(error))
    return entry


def remove(store: Store, entry: Entry) -> Removal:
    from malhae.store import adapters, config, model_settings, models_view

    settings = config.load()
    out = Removal(entry, adapters.orphaned(entry, store.entries()))
    own = model_settings.sidecar(store, entry)
    if model_settings.reset(store, entry.name):  # first: the next model of this name must not inherit them
        out.settings_file = own
    store.remove(entry.name)
    if models_view.is_default(entry, settings.default_model):
        config.set_default_model(None, settings.path)
        out.default_in = settings.path
    return out
