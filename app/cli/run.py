"""`malhae complete`, `malhae ask` and `malhae chat`: generation on a local model (or a server's)."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import typer

from malhae.cli import options as o

PROMPT_ARG = typer.Argument(None, help="The text; `-` or nothing reads it from a pipe.")
STOP = typer.Option([], "--stop", metavar="TEXT", help="Stop before this text (repeatable).")
FILES = typer.Option([], "--file", metavar="FILE", help="A UTF-8 text file to put before the text, after piped input "
                     "(repeatable, in order).")


def _oneshot_options(
    prompt: str | None = PROMPT_ARG, model: o.ModelOption = None, max_tokens: o.OneShotMaxTokens = None,
    temperature: o.Temperature = None, top_p: o.TopP = None, top_k: o.TopK = None, min_p: o.MinP = None,
    repeat_penalty: o.RepeatPenalty = None, repeat_last_n: o.RepeatLastN = None, seed: o.Seed = None,
    frequency_penalty: o.FrequencyPenalty = None, presence_penalty: o.PresencePenalty = None, stop: list[str] = STOP,
    template: o.Template = None, json_out: o.Json = False, endpoint: o.EndpointOption = None,
    api_key: o.ApiKey = None, timeout: o.Timeout = None, remote_chat: o.RemoteChat = False,
    files: list[Path] = FILES, schema: o.Schema = None, grammar: o.GrammarOption = None,
) -> None:
    """The options `ask` and `complete` share, declared once: never called, its signature is theirs (and
    @load_flags adds the load options)."""


def _oneshot(kind: str, prompt: str | None, model: str | None, json_out: bool, stop: list[str], files: list[Path],
             endpoint: str | None, api_key: str | None, timeout: float | None, load: dict[str, object],
             template: str | None = None, remote_chat: bool = False, schema: str | None = None,
             grammar: str | None = None, **sampling: object) -> None:
    """`complete` and `ask`: only how the prompt is framed differs (ask puts it in the model's template)."""
    from malhae import ui
    from malhae.chat import oneshot, writer
    from malhae.runtime import grammar as grammars
    from malhae.store import model_settings, models

    constraint = grammars.from_argument(schema, grammar)  # before anything is loaded
    remote = o.endpoint_for(endpoint, api_key, timeout, remote_chat=remote_chat, flags=load, notify=ui.note)
    path = models.resolve(model) if remote is None else None  # for its own settings; said below, once checked
    options, chosen = o.settings_for(kind, tuple(stop), remote=remote is not None, model=path, **load, **sampling)
    chosen.grammar = constraint
    given = oneshot.read_prompt(prompt, kind, files or (), notify=ui.note)
    own = model_settings.for_path(path) if path is not None else model_settings.ModelSettings()
    if path is not None:
        options = replace(options, model=models.resolve(model, ui.note))
    shot = oneshot.run(kind, given.text, options, chosen, template=template or own.template, system=own.system,
                       notify=ui.note, endpoint=remote, model=model if remote else None, remote_chat=remote_chat,
                       documents=given.documents)
    if json_out:
        ui.json_result(shot.collect())
    else:
        writer.write_oneshot(shot)
    oneshot.check_complete(shot)


def _command(kind: str, help_text: str, leave_out: tuple[str, ...] = ()):
    """The Typer command `kind`: _oneshot_options' signature, less the options in `leave_out`."""
    shared = inspect.signature(_oneshot_options, eval_str=True)  # Typer reads the Annotated options from it

    def command(**options: object) -> None:
        _oneshot(kind, **options)

    command.__signature__ = shared.replace(parameters=[p for name, p in shared.parameters.items()
                                                       if name not in leave_out])
    command.__annotations__ = {k: v for k, v in _oneshot_options.__annotations__.items() if k not in leave_out}
    command.__name__ = command.__qualname__ = kind
    command.__doc__ = help_text
    return o.load_flags()(command)


complete = _command("complete", "Continue a text as it is (raw completion, for base models).",
                    leave_out=("template", "remote_chat"))
ask = _command("ask", "Ask one question, framed in the model's prompt format, and print the answer.")


@o.load_flags()
def chat(
    load: dict[str, object],
    model: o.ModelOption = None, template: o.Template = None,
    system: str | None = typer.Option(None, "--system", help="System text (default: the template's)."),
    temperature: o.Temperature = None,
    top_p: o.TopP = None, top_k: o.TopK = None, min_p: o.MinP = None, repeat_penalty: o.RepeatPenalty = None,
    max_tokens: o.ChatMaxTokens = None,
    seed: int | None = typer.Option(None, "--seed", help="Fix the sampling seed for repeatable answers."),
    no_color: bool = typer.Option(False, "--no-color", help="No colours or styles (also: the NO_COLOR variable)."),
    endpoint: o.EndpointOption = None, api_key: o.ApiKey = None, timeout: o.Timeout = None,
    remote_chat: o.RemoteChat = False, schema: o.Schema = None, grammar: o.GrammarOption = None,
) -> None:
    """Talk with a model: streaming answers, input history, /commands; /help inside for more (대화)."""
    from malhae import nfc, ui
    from malhae.chat import session
    from malhae.runtime import grammar as grammars
    from malhae.store import model_settings, models

    constraint = grammars.from_argument(schema, grammar)  # every answer held to it, as `ollama run --format json`
    system = nfc.compose(system, "--system", ui.note) if system is not None else None
    remote = o.endpoint_for(endpoint, api_key, timeout, remote_chat=remote_chat, flags=load, notify=ui.note)
    path = models.resolve(model) if remote is None else None  # its own settings (`malhae models set`); said later
    options, sampling = o.settings_for("chat", remote=remote is not None, model=path, **load, temperature=temperature,
                                       top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                       max_tokens=max_tokens, seed=seed)
    sampling.grammar = constraint
    own = model_settings.for_path(path) if path is not None else model_settings.ModelSettings()
    session.open_chat(options, model=model, resolve=models.resolve, template=template or own.template,
                      system=system if system is not None else own.system, sampling=sampling, no_color=no_color,
                      endpoint=remote, remote_chat=remote_chat).run()
