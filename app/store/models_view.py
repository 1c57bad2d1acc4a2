"""Rendering for `malhae models`: the store table, its JSON, and the copy progress bar. Results go to stdout, status
to stderr, like the rest of the CLI (app/ui.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from malhae import units
from malhae.store import settings_view
from malhae.store.adapters import Listing
from malhae.store.local import Entry
from malhae.store.models import DEMO_NAMES
from malhae.ui import Bars, err, note, out

BIG_FILE = 64 << 20  # smaller copies finish before a bar would be worth drawing


def is_default(entry: Entry, default: str | None) -> bool:
    if not default:
        return False
    if default == entry.name:
        return True
    try:
        return Path(default).expanduser().resolve() == entry.path.resolve()
    except OSError:
        return False


def _runs_by_default(entry: Entry, default: str | None, store_names: set[str]) -> bool:
    """Whether a command without --model runs this entry: the default model, or the built-in demo when no default
    is set (a default_model that names the demo, by one of its names the store does not have, is the demo too)."""
    if entry.builtin:
        chosen = (default or "").strip()
        return not chosen or (chosen in DEMO_NAMES and chosen not in store_names) or is_default(entry, default)
    return is_default(entry, default)


def models_table(listing: Listing, root: Path, default: str | None, config_path: Path, as_json: bool,
                 settings: dict | None = None) -> None:
    """The store's models and, after them, the built-in demo (Entry.builtin); `*` marks what runs without -m. Each
    LoRA adapter is listed under the models it belongs to (app.store.adapters), those without one at the end.
    `settings`: each entry's own settings by name (app.store.model_settings.listed), marked `+` (`!`: a broken
    file) in the mark column: the table is read at 80 columns and has no room for another."""
    entries = listing.models
    settings = settings or {}
    store_names = {e.name for e in entries if not e.builtin}
    marked = [_runs_by_default(e, default, store_names) for e in entries]
    adapters = list(dict.fromkeys([a for found in listing.under.values() for a in found] + listing.apart))
    if as_json:
        data = {"dir": str(root), "default": default, "config": str(config_path),
                "models": [e.as_dict() | {"default": m} | settings_view.as_json(settings.get(e.name))
                           for e, m in zip(entries, marked, strict=True)],
                "adapters": [a.as_dict() | {"for": listing.bases_of(a)} | settings_view.as_json(settings.get(a.name))
                             for a in adapters]}
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        return
    how = ("`malhae pull polyglot-ko-1.3b`, `malhae models import FILE.gguf` or `malhae convert DIR --type q4_k_m "
           "--add`")
    if not entries and not adapters:
        out.print(f"no models in the store yet ({escape(str(root))}). Add one with {how}.", soft_wrap=True,
                  markup=False)
        return
    table = Table(title="malhae models")
    for col, justify in (("", "left"), ("name", "left"), ("type", "left"), ("size (GB)", "right"),
                         ("params", "right"), ("source", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for e, mark in zip(entries, marked, strict=True):
        mark = ("*" if mark else "") + settings_view.mark(settings.get(e.name))
        if e.error:  # the reason is long: `malhae info NAME` says it; the table says what to do
            table.add_row(mark, escape(e.name), "[red]unreadable[/red]", units.gb(e.size), "?",
                          escape(f"broken: see `malhae info {e.name}`, remove with `malhae models rm {e.name}`"))
        else:
            source = "built-in (bundled with malhae)" if e.builtin else e.source or ""
            table.add_row(mark, escape(e.name), e.type, units.gb(e.size), units.params(e.params), escape(source))
        for a in listing.under.get(e.name, []):
            _adapter_row(table, a, "└ ", f"LoRA adapter, {units.size(a.size)}: --lora {a.name}",
                         settings_view.mark(settings.get(a.name)))
    if listing.apart:
        table.add_section()
        for a in listing.apart:
            base = f"its base {a.base} is not in the store" if a.base else "its base is not named"
            _adapter_row(table, a, "", f"LoRA adapter, {units.size(a.size)}; {base}",
                         settings_view.mark(settings.get(a.name)))
    out.print(table)
    legend = "* the default model (`malhae models default NAME`)" if any(marked) else \
        "no default model among these: `malhae models default NAME`"
    legend += settings_view.legend(settings.values())
    where = f"{root}: none of yours yet; add one with {how}" if not store_names else str(root)
    err.print(f"[dim]{escape(where)} · {legend}[/dim]", soft_wrap=True)


def _adapter_row(table: Table, a: Entry, indent: str, source: str, mark: str) -> None:
    if a.error:
        table.add_row(mark, escape(indent + a.name), "[red]unreadable[/red]", units.gb(a.size), "?",
                      escape(f"broken: see `malhae info {a.name}`, remove with `malhae models rm {a.name}`"))
        return
    table.add_row(mark, escape(indent + a.name), f"lora {a.type}", units.gb(a.size), units.params(a.params),
                  escape(source))


def default_line(default: str | None, config_path: Path, exists: bool, resolved: str | None) -> None:
    if default:
        where = f" → {resolved}" if resolved and resolved != default else ""
        out.print(f"default model: {default}{where} (default_model in {config_path})", markup=False, soft_wrap=True)
    else:
        place = config_path if exists else f"{config_path}, not created yet"
        out.print(f"no default model set ({place}); commands use the bundled demo model (demo). Set one with "
                  "`malhae models default NAME`.", markup=False, soft_wrap=True)


class CopyProgress(Bars):
    """A byte progress bar for copies into the store, drawn only for large files on a terminal."""

    def __init__(self, label: str, total: int) -> None:
        super().__init__(TextColumn(escape(label)), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                         TimeRemainingColumn(), enabled=total >= BIG_FILE)
        self._label = label

    def update(self, done: int, total: int) -> None:
        if self.enabled:
            self.advance("copy", self._label, done, total)


def added(entry: Entry, root: Path) -> None:
    if entry.adapter:
        base = f" (trained on {entry.base})" if entry.base else ""
        out.print(f"added the LoRA adapter {entry.name} ({units.size(entry.size)}) to {root}; apply it to the model it "
                  f"adapts{base}: malhae chat -m MODEL --lora {entry.name}", markup=False, soft_wrap=True)
        return
    out.print(f"added {entry.name} ({entry.type}, {units.size(entry.size)}) to {root}; run it with "
              f"malhae chat -m {entry.name}", markup=False, soft_wrap=True)


def removed(entry: Entry) -> None:
    out.print(f"removed {entry.name} ({entry.path})", markup=False, soft_wrap=True)


def orphans(removed: Entry, adapters: list[Entry]) -> None:
    """`models rm BASE`: the adapters that no model in the store can take any more (they stay)."""
    if adapters:
        note(f"left without their base in the store: {', '.join(a.name for a in adapters)} (LoRA adapters for "
             f"{removed.name}); add that model again, or remove them with `malhae models rm NAME`")


def default_removed(config_path: Path) -> None:
    note(f"it was the default model; default_model removed from {config_path} (the bundled demo is the default "
         "until you set another with `malhae models default NAME`)")


def default_set(value: str | None, config_path: Path) -> None:
    if value is None:
        out.print(f"default model cleared in {config_path}", markup=False, soft_wrap=True)
    else:
        out.print(f"default model: {value} (default_model in {config_path})", markup=False, soft_wrap=True)
