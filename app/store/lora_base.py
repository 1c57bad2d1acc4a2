"""Which model a PEFT adapter is converted against (`malhae convert ADAPTER --base …`): its shapes are checked and
its QKV rows reordered by that model's heads.

Given: a Hugging Face folder, a store name or a .gguf. Not given: the folder the adapter's own config names
(training scripts save an absolute base_model_name_or_path), else a store model of that hub id or name that the
adapter fits (the store's own rule for an adapter's base: app.store.adapters). The store and the file system are
looked at here, never the network.
"""

from __future__ import annotations

from pathlib import Path

from malhae.errors import UserError


def find_base(given: str | None, adapter, notify=None):
    """The convert.lora_gguf.Base to convert `adapter` (a convert.lora.Adapter) against."""
    from malhae.convert.lora_gguf import Base

    trained_on = adapter.config.base
    if given:
        folder = Path(given).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise UserError(f"--base {given} is a folder without config.json; give the base's Hugging Face "
                                "folder, a .gguf of it or its name in `malhae models`")
            return Base.from_checkpoint(folder)
        from malhae.store import models

        return Base.from_gguf(models.resolve(given, notify))
    if trained_on:
        folder = Path(trained_on).expanduser()
        if folder.is_dir() and (folder / "config.json").is_file():
            return Base.from_checkpoint(folder)
        found = store_base(adapter)
        if found is not None:
            return found
    said = f"it was trained on {trained_on}, which" if trained_on else "its adapter_config.json names no base, and it"
    raise UserError(f"which model is this adapter for? {said} is neither a folder here nor in `malhae models`; "
                    "give --base: the base's Hugging Face folder, a .gguf of it or its store name")


def store_base(adapter):
    """The first store model (by name) that the adapter names as its base (app.runtime.lora.other_base: its hub id,
    folder or name) and fits by shape; None if there is none."""
    from malhae.convert.lora_gguf import Base, check_fits
    from malhae.runtime.lora import other_base
    from malhae.store.local import open_store

    for entry in open_store().entries():
        if entry.error or entry.adapter or other_base(adapter.config.base, [entry.source, entry.name,
                                                                            entry.path.name]):
            continue
        base = Base.from_gguf(entry.path)
        try:
            check_fits(adapter, base)
        except UserError:
            continue
        return base
    return None
