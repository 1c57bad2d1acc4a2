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


def note(message: str) -> None:
    """A one-time remark about what malhae decided for the user (stderr, never mixed into the output)."""
    err.print(f"[dim]malhae: {escape(message)}[/dim]")


def json_result(data: dict) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
