"""Which model a PEFT adapter is converted against (`malhae convert ADAPTER --base …`): its shapes are checked and
its QKV rows reordered by that model's heads.

Given: a Hugging Face folder, a store name or a .gguf. Not given: the folder the adapter's own config names
(training scripts save an absolute base_model_name_or_path), else the store model converted from that hub id (or of
that name). The store and the file system are looked at here, never the network.
"""

from __future__ import annotations

from pathlib import Path

from malhae.errors import UserError


def find_base(given: str | None, trained_on: str | None, notify=None):
    """The convert.lora_gguf.Base to convert against."""
    from malhae.convert.lora_gguf import Base

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
        entry = store_model(trained_on)
        if entry is not None:
            return Base.from_gguf(entry.path)
    said = f"it was trained on {trained_on}, which" if trained_on else "its adapter_config.json names no base, and it"
    raise UserError(f"which model is this adapter for? {said} is neither a folder here nor in `malhae models`; "
                    "give --base: the base's Hugging Face folder, a .gguf of it or its store name")


def store_model(trained_on: str):
    """The store's model converted from `trained_on` (a hub id or a name), not an adapter; None if there is none."""
    from malhae.store.local import open_store

    wanted = trained_on.rstrip("/").lower()
    short = wanted.rsplit("/", 1)[-1]
    candidates = []
    for entry in open_store().entries():
        if entry.error or entry.architecture != "gptneox" or _is_adapter(entry.path):
            continue
        source = (entry.source or "").lower().removeprefix("https://huggingface.co/")
        if source == wanted or source.rsplit("/", 1)[-1] == short:
            candidates.append((0, entry))
        elif entry.name.lower().startswith(short):
            candidates.append((1, entry))
    candidates.sort(key=lambda c: (c[0], c[1].name))  # any of its types: the shapes and heads are the same
    return candidates[0][1] if candidates else None


def _is_adapter(path: Path) -> bool:
    from gguf import Keys

    from malhae.runtime.gguf_info import read_info

    try:
        return read_info(path).metadata.get(Keys.General.TYPE) == "adapter"
    except UserError:
        return False
