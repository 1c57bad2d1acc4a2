"""Which model file a command runs: the one given (a path or a store name), else the settings file's default_model,
else the bundled demo model (said once).

Every command goes through `resolve` so that they all agree on what `--model X` means. A value is a path when it
names an existing file, contains a path separator or ends in .gguf; otherwise it is a name in the model store. That
rule is decided by the text alone (plus one existence check), so `malhae chat -m foo` never silently picks a file
called `foo` in the current directory over the store when the user meant the store, unless that file exists.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from malhae.errors import UserError

DEMO_MODEL = "malhae-demo-ko-f16.gguf"


def demo_model() -> Path | None:
    path = Path(str(resources.files("malhae.models").joinpath(DEMO_MODEL)))
    return path if path.is_file() else None


def is_path(value: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (any(s in value for s in seps) or value.lower().endswith(".gguf") or value.startswith("~")
            or _exists(value))


def _exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except OSError:  # a name too long for the file system is no file; the store's name rule will say why
        return False


def resolve(model: str | None, notify=None) -> Path:
    if model:
        return _resolve_value(model)
    from malhae.store import config

    settings = config.load()
    if settings.default_model:
        try:
            return _resolve_value(settings.default_model)
        except UserError as e:
            raise UserError(f"the default model (default_model in {settings.path}): {e}; change it with "
                            "`malhae models default NAME`") from None
    demo = demo_model()
    if demo is None:
        raise UserError("no model given: pass --model NAME or FILE.gguf, or set one with `malhae models default NAME` "
                        "(make one from a Polyglot-Ko checkpoint with `malhae convert`)")
    if notify:
        notify(f"no model given: using the bundled demo model ({demo.name}), a tiny model trained on the Korean "
               "constitution — not an assistant. Pass --model NAME or FILE.gguf for a real one, or set one with "
               "`malhae models default NAME`.")
    return demo


def _resolve_value(value: str) -> Path:
    if is_path(value):
        return Path(value).expanduser()
    from malhae.store.local import open_store

    store = open_store()
    entry = store.get(value)
    if entry is None:
        raise store.not_found(value)
    return entry.path


def default_value(name: str) -> str:
    """What `malhae models default NAME` writes: a store name as it is, a path made absolute; both checked first."""
    if not is_path(name):
        from malhae.store.local import open_store

        store = open_store()
        entry = store.get(name)
        if entry is None:
            raise store.not_found(name)
        return entry.name
    from malhae.runtime.engine import check_model_file

    path = Path(name).expanduser().absolute()
    check_model_file(path)
    return str(path)
