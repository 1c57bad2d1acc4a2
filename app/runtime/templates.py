"""Prompt formats, read from models/templates.toml (data), and the prompt text they make for a conversation.

Base Polyglot-Ko models are plain language models: they answer only inside a dialogue frame, and they would go on to
write the user's next line unless stopped, which is what each format's stop strings are for.

Each format also has the same framing as Hugging Face chat-template Jinja (`chat_template`), which the converter writes
into the GGUF (tokenizer.chat_template) so that other GGUF runners frame prompts like malhae. Reading a GGUF, malhae
prefers that template over a guess from the model's name; a Jinja template that is not one of ours is rendered with
jinja2 the way transformers and llama-cpp-python render it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from gguf import Keys

from malhae.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GGUF_ORIGIN = "the model's chat template (tokenizer.chat_template in the GGUF)"
FIX = "choose a format with --template base|koalpaca|kullm"


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
    chat_template: str = ""  # the same framing as Hugging Face chat-template Jinja

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

    def stops(self, given: tuple[str, ...], grammar: object = None) -> tuple[str, ...]:
        """The stop texts of an answer: the template's turn markers, then the ones given. An answer held to a grammar
        (a JSON schema) ends where the grammar ends: a turn marker inside a JSON string ("사용자:" quoted in a
        summary) must not cut the JSON in half, so only the given ones apply."""
        return given if grammar is not None else tuple(dict.fromkeys((*self.stop, *given)))


@cache
def all_templates() -> dict[str, Template]:
    raw = tomllib.loads(resources.files("malhae.models").joinpath("templates.toml").read_text(encoding="utf-8"))
    return {name: Template(name=name, description=t.get("description", ""), system=t.get("system", ""),
                           system_format=t.get("system_format", ""), user=t["user"], assistant=t["assistant"],
                           assistant_end=t.get("assistant_end", "\n"), stop=tuple(t.get("stop", ())),
                           match=tuple(t.get("match", ())), chat_template=t.get("chat_template", ""))
            for name, t in raw.items()}


def get(name: str) -> Template:
    templates = all_templates()
    if name not in templates:
        raise UserError(f"unknown template {name!r}; choose one of: {', '.join(templates)}")
    return templates[name]


def identify(*names: str | None) -> Template | None:
    """The format a model is known to use, from its name, folder or hub id; None when none of them says.

    The instruction-tuned formats are checked first: a fine-tune's name often contains the base model's too.
    """
    text = " ".join(n for n in names if n).lower()
    ordered = sorted(all_templates().values(), key=lambda t: t.name == "base")
    return next((t for t in ordered if any(m in text for m in t.match)), None)


def for_model(model_name: str | None) -> Template:
    """The format a model was trained with, from its name; the base dialogue frame when unknown."""
    return identify(model_name) or all_templates()["base"]


def from_jinja(source: str) -> Template | None:
    """Our format whose Jinja this is (ignoring surrounding whitespace), or None for a foreign template."""
    return next((t for t in all_templates().values() if t.chat_template.strip() == source.strip()), None)


def for_gguf(model_name: str | None, metadata: Mapping[str, object], token_text=None) -> Template:
    """The format for a loaded GGUF: its own tokenizer.chat_template first, then the guess from its name.

    `token_text(id)` gives a token's text, for the bos/eos tokens a foreign Jinja template may use; without it they
    are empty.
    """
    def text(key: str) -> str:
        token = metadata.get(key)
        return token_text(int(token)) if token_text is not None and isinstance(token, int) else ""

    source = metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
    return for_source(model_name, source if isinstance(source, str) else None, text(Keys.Tokenizer.BOS_ID),
                      text(Keys.Tokenizer.EOS_ID))


def for_source(model_name: str | None, source: str | None, bos_token: str = "", eos_token: str = "", *,
               origin: str = GGUF_ORIGIN) -> Template:
    """The format a model's own chat template (Jinja, from a GGUF or a server) names, else the guess from its name.
    `origin` names where the template came from, for the messages about it."""
    if source and source.strip():
        ours = from_jinja(source)
        if ours is not None:
            return ours
        return JinjaTemplate.make(source, bos_token=bos_token, eos_token=eos_token, origin=origin)
    return for_model(model_name)


def for_engine(engine) -> Template:
    """The format for a running backend (a local Engine or a server's model): its own template, else its name's."""
    origin = f"the server's chat template ({engine.where})" if getattr(engine, "remote", False) else GGUF_ORIGIN
    return for_source(engine.name, *engine.chat_template_info(), origin=origin)


@dataclass(frozen=True)
class JinjaTemplate(Template):
    """A model's own chat template that malhae does not know: rendered with jinja2 the way transformers and
    llama-cpp-python render chat templates (sandboxed, trim_blocks and lstrip_blocks, loop controls), within bounds
    on memory and time (app.runtime.sandbox): it comes from a file or a server, and may be broken or hostile."""

    bos_token: str = ""
    eos_token: str = ""
    origin: str = GGUF_ORIGIN  # where it came from, for the messages about it
    _compiled: object = field(default=None, compare=False, repr=False)

    @classmethod
    def make(cls, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = GGUF_ORIGIN) -> JinjaTemplate:
        from malhae.runtime import sandbox

        try:
            compiled = sandbox.BoundedEnvironment().from_string(source)
        except Exception as e:  # a TemplateSyntaxError, or whatever compiling a hostile template raises
            raise UserError(f"{origin} is not valid Jinja ({_reason(e)}); {FIX}") from None
        stop = tuple(s for s in (eos_token,) if s)
        description = "the model's own chat template (Jinja from the GGUF)" if origin == GGUF_ORIGIN else origin
        return cls(name="gguf", description=description, system="", system_format="", user="", assistant="",
                   assistant_end="", stop=stop, match=(), chat_template=source, bos_token=bos_token,
                   eos_token=eos_token, origin=origin, _compiled=compiled)

    def prompt(self, turns: list[tuple[str, str]], system: str | None = None) -> str:
        """No system text (None or empty) means no system message: the template's own default then applies.

        Whatever rendering raises — the template's raise_exception, 1/0, a bound of app.runtime.sandbox, a
        MemoryError or a RecursionError — is one line naming the template's source and the way around it."""
        from malhae.runtime import sandbox

        messages = ([{"role": "system", "content": system}] if system else [])
        messages += [{"role": role, "content": text} for role, text in turns]
        try:
            return sandbox.render(self._compiled, messages=messages, add_generation_prompt=True,
                                  bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # MemoryError and RecursionError are Exceptions too
            raise UserError(f"{self.origin} failed: {_reason(e)}; {FIX}") from None


def _reason(error: Exception) -> str:
    """An exception from a template as a short line: its own message (a TemplateError's, raise_exception's), else its
    kind too ("ZeroDivisionError: division by zero")."""
    import jinja2

    from malhae.runtime.sandbox import Exceeded

    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:199] + "…"
    if isinstance(error, (jinja2.TemplateError, UserError, Exceeded)):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
