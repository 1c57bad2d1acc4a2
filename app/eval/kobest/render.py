"""How `malhae eval kobest` shows itself: a progress bar on stderr, then the seed's table (tasks × shots, macro F1)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from malhae.eval.kobest.evaluate import Report
from malhae.eval.kobest.tasks import all_tasks
from malhae.ui import Bars


class KobestProgress(Bars):
    """One bar per (task, shots) cell, each created when the cell starts, left on the screen as a record."""

    def __init__(self) -> None:
        super().__init__(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                         TimeRemainingColumn(), transient=False)

    def update(self, title: str, shots: int, done: int, total: int) -> None:
        self.advance((title, shots), f"{title} {shots}-shot", done, total)


def table(report: Report, as_json: bool) -> None:
    from malhae.ui import err, json_result, note, out

    if as_json:
        json_result(report.as_dict())
        return
    shots = list(dict.fromkeys(c.shots for c in report.cells))
    names = list(dict.fromkeys(c.task for c in report.cells))
    titles = all_tasks()
    grid = {(c.task, c.shots): c for c in report.cells}
    t = Table(title="KoBEST macro F1")
    t.add_column("task")
    for k in shots:
        t.add_column(f"{k}-shot", justify="right")
    for name in names:
        row = [titles[name].title if name in titles else name]
        for k in shots:
            c = grid.get((name, k))
            row.append("—" if c is None or c.f1 is None else f"{c.f1:.4f}")
        t.add_row(*row)
    out.print(t)
    # below the table rather than in its title or caption, which a narrow table would wrap
    lora = f" + LoRA {', '.join(report.adapters)}" if report.adapters else ""
    out.print(f"model: {report.model.rsplit('/', 1)[-1]}{lora} · data: {report.data}", soft_wrap=True,
              highlight=False)
    done = [c for c in report.cells if c.f1 is not None]
    if done:
        per_task = ", ".join(f"{titles[c.task].title if c.task in titles else c.task} {c.shots}-shot {c.n} docs "
                             f"{c.seconds:.1f} s" for c in done)
        err.print(f"[dim]{per_task}; window {report.max_length} tokens[/dim]", soft_wrap=True)
    for c in report.cells:
        if c.skipped:
            note(f"{c.task} {c.shots}-shot skipped: {c.skipped}")
