"""The names `malhae serve` answers to, and what each runs: a store model, the bundled demo, or an adapter preset.

`malhae serve` without -m serves the whole store by name, as Ollama does: a request's `model` is a name from
`malhae models` (an Ollama client's "NAME:latest" too), and what that name runs is decided here, once per request:
the model file, the load settings (the server's flags, then the model's own settings from `malhae models set`), and
what the name adds on top of a loaded model — an adapter preset's LoRA, the model's system text, template and
sampling defaults. A LoRA adapter in the store is a name of its own: it runs on its base model, which is loaded once
for the base and all of its presets (app.serve.residency keys loaded models by file, not by name).

With -m the server serves that model only, under any name (`pinned`: app.runtime.target.Pinned, with the model's own
settings applied here).

Errors are UserErrors the server turns into answers: NotFound (404) for a name not served, Broken (500) for a model
file that cannot be read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

from malhae.errors import Broken, NotFound, UserError
from malhae.runtime.settings import LoadOptions, Lora, kv_fields
from malhae.runtime.target import Pinned, Target

MAX_LISTED = 20  # names a 404 lists


def pinned(load: LoadOptions, name: str, template: str | None = None) -> Pinned:
    """The -m model (load.model) under `name`, with its own settings (`malhae models set`) over the server's."""
    return Pinned(Served(load, template=template)._target(name, load.model, name, pinned=True), load)


class Served:
    """The store's names (the bundled demo's and adapter presets' too)."""

    pinned = None

    def __init__(self, base: LoadOptions, *, template: str | None = None) -> None:
        """`base`: the server's load settings without a model; `template`: --template, the chat format of every
        model that does not name its own."""
        self.base = base
        self.template = template

    # --- listing -----------------------------------------------------------------------------------------------

    def entries(self) -> list:
        """What /v1/models and /api/tags list: the pinned model, or the store's models and adapter presets (the
        demo's too), in `malhae models`' order; unreadable files are left out (a request for one says why)."""
        from malhae.store import models
        from malhae.store.local import open_store

        entries = [e for e in open_store().entries() if e.error is None]
        return entries + models.builtin_entries([e.name for e in entries])

    # --- Ollama's /api/delete and /api/pull (app.serve.store_api) ------------------------------------------------

    def find(self, name: str):
        from malhae.store import removal
        from malhae.store.local import open_store

        return removal.find(open_store(), name)

    def delete(self, entry):
        from malhae.store import removal
        from malhae.store.local import open_store

        return removal.remove(open_store(), entry)

    def pull(self, name: str, type_name: str, progress) -> str:
        """`malhae pull NAME --type TYPE`, its progress as (stage, done, total); the new model's store name."""
        from malhae.store import pull

        return pull.pull(name, type_name, threads=self.base.threads, progress=progress).entry.name

    def known(self) -> list[str]:
        return [e.name for e in self.entries()]

    # --- one request's name ------------------------------------------------------------------------------------

    def resolve(self, name: object) -> Target:
        """The Target for a request's `model` (None or "": the default model); NotFound lists the names."""
        if name is not None and not isinstance(name, str):
            raise UserError("model must be a string: a name from GET /v1/models or /api/tags")
        wanted = (name or "").strip()
        if wanted.endswith(":latest"):  # Ollama's clients tag names that have no tag
            wanted = wanted[:-len(":latest")]
        if not wanted:
            return self._default()
        return self._named(wanted)

    def _default(self) -> Target:
        from malhae.store import config, models

        chosen = config.load().default_model
        if chosen:
            return self._named(chosen)
        demo = models.demo_model()
        if demo is None:
            raise NotFound("give a model: a name from GET /v1/models or /api/tags (this server has no default; set "
                           "one with `malhae models default NAME`)")
        return self._named(models.DEMO_NAMES[0])

    def _named(self, wanted: str) -> Target:
        from malhae.store import models
        from malhae.store.local import open_store

        if any(c in wanted for c in "/\\") or wanted.startswith(("~", ".")):
            raise self._not_found(wanted)  # a client names models, never files (nor the server's working folder)
        store = open_store()
        entry = store.get(wanted)
        if entry is None:
            path = models.builtin(wanted)
            if path is None:
                raise self._not_found(wanted)
            from malhae.runtime.gguf_info import read_info
            from malhae.store.local import entry_for

            entry = entry_for(wanted, path, read_info(path))
        if entry.error:
            raise Broken(f"the model file of {entry.name!r} cannot be read ({entry.error}); replace it, or remove "
                         f"it with `malhae models rm {entry.name}`")
        if entry.adapter:
            return self._preset(entry)
        return self._target(entry.name, entry.path, entry.name)

    def _preset(self, entry) -> Target:
        """An adapter's name: its base model (the store's rule for an adapter's base, app.store.adapters) with it."""
        from malhae.store import adapters, model_settings

        base = adapters.base_of(entry)
        if base is None:
            raise NotFound(f"{entry.name!r} is a LoRA adapter whose base model ({entry.base or 'not named'}) is not "
                           "in the store; add the base with `malhae pull` or `malhae models import`")
        own = model_settings.for_path(entry.path)
        scale = own.scale if own.scale is not None else 1.0
        target = self._target(entry.name, base.path, base.name)
        return replace(target, adapters=(*target.adapters, Lora(entry.path, float(scale))),
                       **_extras(own, target))

    def _target(self, name: str, path: Path, key: str, *, pinned: bool = False) -> Target:
        """A model file under `name`, with its own settings (none for a file outside the store)."""
        from malhae.store import model_settings

        own = model_settings.for_path(path)
        options = replace(self.base, model=path, **_load_values(own.load_values()))
        found = own.loras()
        if pinned:  # the -m model runs with --lora, as before: its adapters are the server's (ids, POST)
            options = replace(options, lora=(*self.base.lora, *found))
            found = ()
        base = Target(name, key, options, found, template=self.template)
        return replace(base, **_extras(own, base))

    def _not_found(self, wanted: str) -> NotFound:
        names = self.known()
        shown = ", ".join(names[:MAX_LISTED]) + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED
                                                 else "")
        return NotFound(f"model {wanted[:200]!r} is not here; this server has: {shown or 'no models'} (add one with "
                        "`malhae pull` or `malhae models import`)")


def _extras(own, target: Target) -> dict:
    """The settings a name adds on top of a model (its own over those it inherits)."""
    out: dict[str, object] = {"sampling": target.sampling | own.sampling()}
    if own.system is not None:
        out["system"] = own.system
    if own.template is not None:
        out["template"] = own.template
    if own.has_keep_alive:
        out["keep_alive"] = own.keep_alive
    return out


def _load_values(values: dict[str, object]) -> dict[str, object]:
    """A model's load settings as LoadOptions fields (settings.kv_fields: kv_cache sets both K and V)."""
    out = kv_fields(values)
    known = {f.name for f in dataclasses.fields(LoadOptions)}
    return {k: v for k, v in out.items() if k in known}
