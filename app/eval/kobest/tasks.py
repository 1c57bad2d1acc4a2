"""The five KoBEST tasks: how a doc becomes a prompt, its choices and its few-shot example (app/kobest/tasks.toml).

The strings are data because they are the whole point: they must be the polyglot branch's, character for character,
for scores to be comparable with the model card's. Logic here is only what the harness does around them: COPA's
connector, the label as an index into the choices, and the few-shot context ("\\n\\n" between examples, no
description).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from malhae.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Doc = dict[str, Any]


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    fields: tuple[str, ...]
    n_labels: int
    text_format: str
    choice_formats: tuple[str, ...]
    connector_field: str | None = None
    connector_map: tuple[tuple[str, str], ...] = ()
    norm_fields: tuple[str, ...] = ()  # HellaSwag's acc_norm divides by these fields' lengths

    def _values(self, doc: Doc) -> dict[str, str]:
        values = {f: doc[f] for f in self.fields}
        if self.connector_field:
            values["connector"] = dict(self.connector_map)[doc[self.connector_field].strip()]
        return values

    def text(self, doc: Doc) -> str:
        """doc_to_text."""
        return self.text_format.format(**self._values(doc))

    def choices(self, doc: Doc) -> list[str]:
        """The continuations scored, in label order (construct_requests)."""
        values = self._values(doc)
        return [c.format(**values) for c in self.choice_formats]

    def target(self, doc: Doc) -> str:
        """doc_to_target: the gold choice, as appended to a few-shot example."""
        return self.choices(doc)[doc["label"]]

    def norm_lengths(self, doc: Doc) -> list[int] | None:
        """Characters per choice for acc_norm (HellaSwag only in the harness), else None."""
        return [len(doc[f]) for f in self.norm_fields] if self.norm_fields else None

    def context(self, doc: Doc, shots: list[Doc]) -> str:
        """fewshot_context with description "": the examples, each text + target, "\\n\\n" after each, then the doc."""
        examples = "\n\n".join(self.text(d) + self.target(d) for d in shots) + "\n\n" if shots else ""
        return examples + self.text(doc)


@cache
def all_tasks() -> dict[str, Task]:
    raw = tomllib.loads(resources.files("malhae.eval.kobest").joinpath("tasks.toml").read_text(encoding="utf-8"))
    tasks = {}
    for name, t in raw.items():
        conn = t.get("connector", {})
        tasks[name] = Task(name=name, title=t["title"], fields=tuple(t["fields"]), n_labels=t["n_labels"],
                           text_format=t["text"], choice_formats=tuple(t["choices"]),
                           connector_field=conn.get("field"), connector_map=tuple(conn.get("map", {}).items()),
                           norm_fields=tuple(t.get("norm_fields", ())))
    return tasks


def select(names: str | list[str] | None) -> list[Task]:
    """Tasks by name ("copa,wic" or a list), in the order given; None means all five in the seed's order."""
    tasks = all_tasks()
    if names is None:
        return list(tasks.values())
    wanted = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in tasks]
    if unknown or not wanted:
        raise UserError(f"unknown KoBEST task {', '.join(unknown) or '(none given)'}: choose from "
                        f"{','.join(tasks)}")
    return [tasks[n] for n in dict.fromkeys(wanted)]
