"""Rendering for `malhae models`: the store table, its JSON, and the copy progress bar. Results go to stdout, status
to stderr, like the rest of the CLI (app/render.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from app.render import err, out
from app.store import Entry

BIG_FILE = 64 << 20  # smaller copies finish before a bar would be worth drawing


def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def is_default(entry: Entry, default: str | None) -> bool:
    if not default:
        return False
    if default == entry.name:
        return True
    try:
        return Path(default).expanduser().resolve() == entry.path.resolve()
    except OSError:
        return False


def models_table(entries: list[Entry], root: Path, default: str | None, config_path: Path, as_json: bool) -> None:
    if as_json:
        data = {"dir": str(root), "default": default, "config": str(config_path),
                "models": [e.as_dict() | {"default": is_default(e, default)} for e in entries]}
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        return
    if not entries:
        out.print(f"no models in the store yet ({escape(str(root))}). Add one with "
                  "`malhae convert DIR --type q4_k_m --add`, `malhae models import FILE.gguf` or "
                  "`malhae pull polyglot-ko-1.3b`.", soft_wrap=True, markup=False)
        return
    table = Table(title="malhae models")
    for col, justify in (("", "left"), ("name", "left"), ("type", "left"), ("size (GB)", "right"),
                         ("params", "right"), ("source", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for e in entries:
        mark = "*" if is_default(e, default) else ""
        if e.error:
            table.add_row(mark, escape(e.name), "[red]unreadable[/red]", gb(e.size), "?", escape(e.error))
        else:
            table.add_row(mark, escape(e.name), e.type, gb(e.size), params(e.params), escape(e.source or ""))
    out.print(table)
    legend = "* the default model (`malhae models default NAME`)" if any(
        is_default(e, default) for e in entries) else "no default model among these: `malhae models default NAME`"
    err.print(f"[dim]{escape(str(root))} · {legend}[/dim]", soft_wrap=True)


def default_line(default: str | None, config_path: Path, exists: bool, resolved: str | None) -> None:
    if default:
        where = f" → {resolved}" if resolved and resolved != default else ""
        out.print(f"default model: {default}{where} (default_model in {config_path})", markup=False, soft_wrap=True)
    else:
        place = config_path if exists else f"{config_path}, not created yet"
        out.print(f"no default model set ({place}); commands use the bundled demo model. Set one with "
                  "`malhae models default NAME`.", markup=False, soft_wrap=True)


class CopyProgress:
    """A byte progress bar for copies into the store, drawn only for large files on a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.enabled = total >= BIG_FILE and err.is_terminal
        self._progress = Progress(TextColumn(escape(label)), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                  TimeRemainingColumn(), console=err, transient=True)
        self._task = self._progress.add_task(label, total=total)

    def __enter__(self) -> CopyProgress:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.stop()

    def update(self, done: int, total: int) -> None:
        if self.enabled:
            self._progress.update(self._task, completed=done, total=total)
