"""The terminal, for every view: results on stdout, status and notes on stderr, JSON in one place.

Views live with what they show (app/store/*_view.py, app/eval/views.py, app/chat/output.py); this holds what they
share, so that every command writes results and remarks the same way (a pipe gets plain results, never a note).
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape


def soft_wrap(console: Console) -> bool:
    """How a console breaks long messages: on a terminal rich wraps them at spaces to its width (left to the
    terminal, they break mid-word); into a pipe or a file each stays one line, as scripts and logs read them."""
    return not console.is_terminal


out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
err.soft_wrap = soft_wrap(err)


# C0/C1 control characters and DEL, except tab and newline, and the bidirectional embeddings, overrides and isolates
# (U+202A-202E, U+2066-2069). Text from outside — a model's answer, a server's error message, a model id it lists —
# must not move the cursor, retitle the window, clear the screen or show its characters in another order than sent.
UNPRINTABLE = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F),
                             *range(0x2066, 0x206A)])
_ONE_LINE = UNPRINTABLE | dict.fromkeys([0x09, 0x0A, 0x0D, 0x2028, 0x2029], " ")  # U+2028/9: line, paragraph breaks


def printable(text: str, *, multiline: bool = False) -> str:
    """`text` with no control character left: the one rule for anything printed that malhae did not write itself.
    Multi-line output (an answer) keeps its newlines and tabs; a one-line message (an error, a note) turns line breaks
    and tabs into spaces, so that it stays one line whatever a server put in it."""
    return text.translate(UNPRINTABLE if multiline else _ONE_LINE)


def note(message: str) -> None:
    """A one-time remark about what malhae decided for the user (stderr, never mixed into the output)."""
    err.print(f"[dim]malhae: {escape(printable(message))}[/dim]")


def json_result(data: dict) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


class Bars:
    """Progress bars on stderr, the one way every command shows work in progress.

    Started at the first bar (a command that fails before any work prints its one error line and nothing else) and
    drawn only on a terminal: in a pipe or a log, rich's final redraw of the bars was a stray blank line in front of
    the error message. Subclasses say what a bar shows; `bar(key, …)` creates one the first time a key reports."""

    def __init__(self, *columns, transient: bool = True, enabled: bool = True) -> None:
        from rich.progress import Progress

        self.enabled = enabled and err.is_terminal
        self._progress = Progress(*columns, console=err, transient=transient, disable=not self.enabled)
        self._bars: dict[object, int] = {}
        self._started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()

    def bar(self, key: object, description: str, total: int | None, **fields: object) -> int:
        if not self._started:
            self._progress.start()
            self._started = True
        if key not in self._bars:
            self._bars[key] = self._progress.add_task(description, total=total, **fields)
        return self._bars[key]

    def advance(self, key: object, description: str, done: int, total: int | None, **fields: object) -> None:
        self._progress.update(self.bar(key, description, total, **fields), completed=done, total=total, **fields)
