"""Opening a chat session: the options checked, the model opened (here or on an endpoint), the template chosen, and
the reader, output and console that fit the process (a prompt on a terminal, plain lines from a pipe).

Apart from app.chat.repl, which runs the session: this is what `malhae chat` (and the tests) call once, before the
first line is read.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import TextIO

from rich.console import Console

from malhae import ui
from malhae.chat.conversation import Conversation
from malhae.chat.reader import LineReader, PromptReader, Reader, open_history
from malhae.chat.repl import Chat, Resolve
from malhae.runtime import templates
from malhae.runtime.backend import Backend, open_backend
from malhae.runtime.endpoint import Endpoint
from malhae.runtime.settings import LoadOptions, Sampling, check


def open_chat(load: LoadOptions, *, model: str | None, resolve: Resolve, template: str | None = None,
              system: str | None = None, sampling: Sampling | None = None, no_color: bool = False,
              reader: Reader | None = None, out: TextIO | None = None, console: Console | None = None,
              endpoint: Endpoint | None = None, remote_chat: bool = False) -> Chat:
    """Check the options, open the model, pick the template; the reader, output and console default to the
    process's own (a prompt on a terminal, plain lines from a pipe). `resolve` turns --model and /model values into
    files (the CLI passes the store's rule, so that this package does not depend on the store). With an `endpoint`,
    --model names the server's model and nothing is loaded here; `load` says how a local model is loaded (its model
    is found from --model here)."""
    sampling = sampling or Sampling()
    no_color = no_color or bool(os.environ.get("NO_COLOR"))
    if console is None:
        console = Console(file=sys.stderr, highlight=False, color_system=None if no_color else "auto")

    def note(message: str) -> None:
        console.print(f"malhae: {ui.printable(message)}", style="dim", markup=False, highlight=False,
                      soft_wrap=ui.soft_wrap(console))

    sampling.checked()
    check("ctx", load.ctx)
    chosen = templates.get(template) if template else None

    def open_engine(options: LoadOptions) -> Backend:
        return open_backend(options, endpoint=endpoint, model=model, remote_chat=remote_chat, notify=note)

    if endpoint is not None:
        with console.status(f"connecting to {endpoint.url}…"):
            engine = open_engine(load)
    else:
        load = replace(load, model=resolve(model, note))
        with console.status(f"loading {load.model.name}…"):
            engine = open_engine(load)
    try:
        conversation = Conversation(chosen or templates.for_engine(engine), sampling, load.ctx, system)
        if out is None:
            out = sys.stdout
        if reader is None and sys.stdin.isatty():
            output = None
            if not sys.stdout.isatty():  # answers go to a file or pipe: the prompt goes to the terminal
                from prompt_toolkit.output import create_output

                output = create_output(stdout=sys.stderr)
            reader = PromptReader(open_history(note), color=not no_color, output=output)
        elif reader is None:
            reader = LineReader(sys.stdin.buffer)
        return Chat(conversation, engine, load, open_engine=open_engine, resolve=resolve, reader=reader, out=out,
                    console=console, terminal=out.isatty(), template_fixed=chosen is not None)
    except BaseException:
        engine.close()
        raise
