"""Rendering for `malhae models set` (a model's own settings, app.store.model_settings) and its cell in `malhae
models`. Results on stdout, remarks on stderr (app/ui.py)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from malhae.errors import UserError
from malhae.store.model_settings import ModelSettings
from malhae.ui import err, json_result, note, out, printable

SHOWN = 60  # characters of a long value (a system text) in the table; --json gives it whole


def _text(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    text = printable(str(value))  # a system text's line breaks shown as spaces: one row per setting
    return text if len(text) <= SHOWN else text[:SHOWN - 1] + "…"


def show(name: str, settings: ModelSettings, as_json: bool) -> None:
    """`malhae models set NAME`: its settings as a table (or JSON), and where they are kept."""
    values = settings.as_dict()
    if as_json:
        json_result({"name": name, "file": str(settings.path) if settings.path else None, "settings": values})
        return
    if not values:
        out.print(f"{name} has no settings of its own; set some with `malhae models set {name} KEY=VALUE`, e.g. "
                  "temperature=0.3 system=… keep_alive=10m", markup=False, soft_wrap=True)
        return
    title = f"{name}'s settings"
    table = Table(title=escape(title), min_width=len(title) + 4)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in values.items():
        table.add_row(key, escape(_text(value)))
    out.print(table)
    err.print(f"[dim]{escape(str(settings.path))} · change one with `malhae models set {escape(name)} KEY=VALUE`, "
              "remove one with KEY=, all with --reset[/dim]", soft_wrap=True)


def changed(name: str, before: set[str], after: ModelSettings, changes: dict[str, str | None],
            as_json: bool) -> None:
    """What `malhae models set NAME KEY=VALUE…` did, in one line."""
    if as_json:
        show(name, after, True)
        return
    shown = after.as_dict()
    done = [f"{k}={_text(shown[k])}" for k in changes if k in shown]
    gone = [k for k, v in changes.items() if v is None and k in before]
    absent = [k for k, v in changes.items() if v is None and k not in before]
    parts = ([f"set {', '.join(done)}"] if done else []) + ([f"removed {', '.join(gone)}"] if gone else []) + \
        ([f"{', '.join(absent)} {'was' if len(absent) == 1 else 'were'} not set"] if absent else [])
    where = f" ({after.path})" if after.path else " (it has no settings left)"
    out.print(f"{name}: {'; '.join(parts)}{where}", markup=False, soft_wrap=True)


def reset(name: str, removed: bool) -> None:
    if removed:
        out.print(f"{name}: every setting removed", markup=False, soft_wrap=True)
    else:
        out.print(f"{name} had no settings of its own; nothing was removed", markup=False, soft_wrap=True)


def removed_with_model(name: str, path: Path) -> None:
    """`malhae models rm NAME`: its settings file went with it."""
    note(f"removed {name}'s settings too ({path})")


def mark(found: ModelSettings | UserError | None) -> str:
    """`malhae models`' mark for an entry with settings of its own: `+`, or `!` when its file is broken."""
    if isinstance(found, UserError):
        return "!"
    return "+" if found is not None and found.values else ""


def legend(found) -> str:
    """The listing's legend for those marks, when any is shown."""
    marks = {mark(f) for f in found}
    return "".join(f" · {m} {what} (`malhae models set NAME`)" for m, what in
                   (("+", "its own settings"), ("!", "its settings file is broken")) if m in marks)


def as_json(found: ModelSettings | UserError | None) -> dict:
    """`malhae models --json`: "settings" for each entry, and the broken file's message."""
    if isinstance(found, UserError):
        return {"settings": None, "settings_error": str(found)}
    return {"settings": found.as_dict() if found is not None else {}}
