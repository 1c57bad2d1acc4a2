"""Prompt formats, read from models/templates.toml (data), and the prompt text they make for a conversation.

Base Polyglot-Ko models are plain language models: they answer only inside a dialogue frame, and they would go on to
write the user's next line unless stopped, which is what each format's stop strings are for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources

from app.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    system: str
    system_format: str
    user: str
    assistant: str
    assistant_end: str
    stop: tuple[str, ...]
    match: tuple[str, ...]

    def prompt(self, turns: list[tuple[str, str]], system: str | None = None) -> str:
        """The text that precedes the next answer; `turns` alternate ("user", text) and ("assistant", text)."""
        sys_text = self.system if system is None else system
        out = [self.system_format.format(system=sys_text) if sys_text and self.system_format else ""]
        for role, text in turns:
            if role == "user":
                out.append(self.user.format(message=text))
            else:
                out.append(self.assistant + (" " if self.assistant.endswith(":") else "") + text
                           + self.assistant_end)
        out.append(self.assistant)
        return "".join(out)


@cache
def all_templates() -> dict[str, Template]:
    raw = tomllib.loads(resources.files("models").joinpath("templates.toml").read_text(encoding="utf-8"))
    return {name: Template(name=name, description=t.get("description", ""), system=t.get("system", ""),
                           system_format=t.get("system_format", ""), user=t["user"], assistant=t["assistant"],
                           assistant_end=t.get("assistant_end", "\n"), stop=tuple(t.get("stop", ())),
                           match=tuple(t.get("match", ()))) for name, t in raw.items()}


def get(name: str) -> Template:
    templates = all_templates()
    if name not in templates:
        raise UserError(f"unknown template {name!r}; choose one of: {', '.join(templates)}")
    return templates[name]


def for_model(model_name: str | None) -> Template:
    """The format a model was trained with, from its name; the base dialogue frame when unknown."""
    name = (model_name or "").lower()
    for template in all_templates().values():
        if any(m in name for m in template.match):
            return template
    return all_templates()["base"]
