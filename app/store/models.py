"""Which model file a command runs: the one given (a path or a store name), else the settings file's default_model,
else the bundled demo model (said once).

Every command goes through `resolve` so that they all agree on what `--model X` means. A value is a path when it
names an existing file, contains a path separator or ends in .gguf; otherwise it is a name in the model store. That
rule is decided by the text alone (plus one existence check), so `malhae chat -m foo` never silently picks a file
called `foo` in the current directory over the store when the user meant the store, unless that file exists.
A name the store does not have may be one of the bundled demo's (DEMO_NAMES: `-m demo`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from malhae.errors import UserError

DEMO_MODEL = "malhae-demo-ko-f16.gguf"
DEMO_LORA = "malhae-demo-ko-lora-signoff.gguf"  # a LoRA adapter of the demo, beside it (models/demo/train_lora.py)
# the names the bundled demo answers to wherever a model name is taken (-m, the settings file, `models default`):
# a model is run by a name from `malhae models`, and the demo is listed there too. A store file of the same name
# comes first (the user put it there); the demo is then listed under its next free name.
DEMO_NAMES = ("demo", Path(DEMO_MODEL).stem)
DEMO_LORA_NAMES = ("demo-signoff", Path(DEMO_LORA).stem)  # --lora demo-signoff: the demo adapter, the same way
DEMO_NOTICE = "no model given: the bundled demo model (a toy); pick yours with -m NAME"  # one line of 80 columns
_said: set[str] = set()  # notices said in this run: each at most once


def demo_model(file: str = DEMO_MODEL) -> Path | None:
    path = Path(str(resources.files("malhae.models").joinpath(file)))
    return path if path.is_file() else None


def new_run() -> None:
    """A new command starts (app/cli/main.py): its notices may be said again, once."""
    _said.clear()


def _once(message: str, notify) -> None:
    if notify and message not in _said:
        _said.add(message)
        notify(message)


def builtin(name: str) -> Path | None:
    """The bundled demo's file for one of its DEMO_NAMES, or its adapter's for DEMO_LORA_NAMES (None: another
    name, or the file is not built)."""
    name = name.strip()
    return demo_model() if name in DEMO_NAMES else demo_model(DEMO_LORA) if name in DEMO_LORA_NAMES else None


def builtin_entries(taken: list[str]):
    """The bundled demo and its adapter as `malhae models` lists them, each under its first name that no store model
    has (none left, or the file not built: not listed)."""
    from dataclasses import replace

    from malhae.runtime.gguf_info import read_info
    from malhae.store.local import entry_for

    out = []
    for names, file in ((DEMO_NAMES, DEMO_MODEL), (DEMO_LORA_NAMES, DEMO_LORA)):
        path = demo_model(file)
        name = next((n for n in names if n not in taken), None)
        if path is not None and name is not None:
            out.append(replace(entry_for(name, path, read_info(path)), builtin=True))
    return out


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
    _once(DEMO_NOTICE, notify)  # one line: on every one-shot command it is read again, so it is short
    return demo


def _is_name(value: str) -> bool:
    """Whether a value is a model's name: not a path, or one of the demo's names that is no file here (a folder
    called demo in the current directory is not what `-m demo` means)."""
    if value.strip() in DEMO_NAMES and not Path(value).is_file():
        return True
    return not is_path(value)


def _resolve_value(value: str) -> Path:
    if not _is_name(value):
        return Path(value).expanduser()
    from malhae.store.local import open_store

    store = open_store()
    entry = store.get(value)
    if entry is None:
        demo = builtin(value)
        if demo is None:
            raise store.not_found(value)
        return demo
    return entry.path


def default_value(name: str) -> str:
    """What `malhae models default NAME` writes: a store name as it is (the demo's too), a path made absolute; both
    checked first."""
    if _is_name(name):
        from malhae.store.local import open_store

        store = open_store()
        entry = store.get(name)
        if entry is None:
            if builtin(name) is None:
                raise store.not_found(name)
            return name.strip()
        if entry.adapter:
            raise UserError(f"'{entry.name}' is a LoRA adapter, not a model: make the model it adapts the default, "
                            f"and apply the adapter by default with lora = [\"{entry.name}\"] in the settings file")
        return entry.name
    from malhae.runtime.engine import check_model_file

    path = Path(name).expanduser().absolute()
    check_model_file(path)
    return str(path)
