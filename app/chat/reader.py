"""What the user types in `malhae chat`: message or /command, continuation rules, and the two readers.

Input is prompt_toolkit on a terminal: line editing that knows a Hangul syllable is two columns wide (no lexer or
other per-character processing is added, so the terminal's IME composition and the cursor stay as they are), history
shared by all sessions and searchable with Ctrl-R, bracketed paste, completion of /commands. From a pipe or a file,
LineReader applies the same rules to plain lines. The rules themselves (needs_more, classify) are pure functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Protocol

from malhae import files
from malhae.errors import UserError
from malhae.runtime import templates
from malhae.runtime.settings import SETTABLE

CONTINUE = "\\"  # a line ending in it goes on on the next line
BLOCK = '"""'  # opens and closes a block of several lines
PROMPT, CONTINUATION = ">>> ", "... "
QUIT_HINT = "to quit, press Ctrl-D or type /exit (종료: Ctrl-D 또는 /exit)"

COMMANDS: dict[str, tuple[str, str]] = {  # name: (arguments, what it does)
    "/help": ("", "this help (도움말)"),
    "/clear": ("", "forget the conversation and start over (대화 지우기)"),
    "/system": ("[TEXT]", "show or set the system text; /system default restores the template's"),
    "/template": ("[NAME]", "show or switch the prompt format: " + ", ".join(templates.all_templates())),
    "/set": ("KEY VALUE", "change a setting: " + ", ".join(SETTABLE) + "; draft off|lookup|MODEL (speculative "
             "decoding), draft_max N"),
    "/show": ("", "model, template, settings and context use"),
    "/retry": ("", "write the last answer again (다시 쓰기)"),
    "/undo": ("", "take back your last message and its answer (되돌리기)"),
    "/save": ("FILE [--force]", "save the conversation as JSON (저장); --force replaces an earlier save"),
    "/load": ("FILE", "continue a saved conversation (불러오기)"),
    "/read": ("[FILE|clear]", "put a text file before your next message (문서 읽기); /read alone lists them, "
              "/read clear drops them"),
    "/model": ("PATH", "switch to another model; the conversation stays"),
    "/lora": ("[NAME [SCALE]|off [NAME]]", "list the LoRA adapters applied, add or rescale one (scale 0 removes it), "
              "/lora off removes all, /lora off NAME one"),
    "/stats": ("", "statistics of the last answer"),
    "/exit": ("", "quit (종료); Ctrl-D does the same"),
}
ALIASES = {"/?": "/help", "/bye": "/exit", "/quit": "/exit", "/r": "/retry"}  # /r was /retry before /read came
KEYS = ("Enter sends · a line ending in \\ goes on · \"\"\" … \"\"\" for several lines · Alt-Enter new line · "
        "↑/↓ and Ctrl-R history · Ctrl-C stops an answer · Ctrl-D quits")


# --- what the user typed ----------------------------------------------------------------------------------------

def needs_more(text: str) -> bool:
    """Whether Enter should start a new line instead of sending: a trailing backslash, or a block not yet closed."""
    stripped = text.lstrip()
    if stripped.startswith(BLOCK):
        return not stripped[len(BLOCK):].rstrip().endswith(BLOCK)
    return text.endswith(CONTINUE)


def to_message(text: str) -> str:
    """The message the typed text stands for: continuation backslashes and block quotes removed, ends trimmed."""
    stripped = text.strip()
    if stripped.startswith(BLOCK):
        body = stripped[len(BLOCK):]
        body = body[: -len(BLOCK)] if body.endswith(BLOCK) else body
        return body.strip("\n").rstrip()  # the first line's indentation is the user's
    return "\n".join(line.removesuffix(CONTINUE) for line in text.split("\n")).strip()


def classify(text: str) -> tuple[str, str]:
    """("command", "/name args"), ("message", text) or ("empty", ""). `//` sends a message that starts with `/`."""
    if text.startswith("//"):
        return "message", to_message(text[1:])
    if text.startswith("/"):
        return "command", to_message(text)
    message = to_message(text)
    return ("message", message) if message else ("empty", "")


def resolve_command(name: str) -> str:
    """The command a name means: exact, an alias, or an unambiguous beginning (/te → /template)."""
    name = name.lower()
    if name in COMMANDS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    names = {**{c: c for c in COMMANDS}, **ALIASES}
    matches = list(dict.fromkeys(target for alias, target in names.items() if alias.startswith(name)))
    matches = matches if len(name) > 1 else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"{name} could be {', '.join(matches)}; type more of it")
    raise UserError(f"unknown command {name}; /help lists the commands (to send a message that starts with /, "
                    "begin it with //)")



class InputCancelled(Exception):
    """Ctrl-C with text at the prompt: drop that text, as a shell does."""


class Reader(Protocol):
    def read(self) -> str:
        """The next raw input (possibly several lines); EOFError at the end, KeyboardInterrupt for Ctrl-C."""
        ...


def history_path() -> Path:
    """chat_history in malhae's data folder (app.files.data_dir): $MALHAE_HOME, else ~/.local/share/malhae."""
    return files.data_dir() / "chat_history"


def open_history(note: Callable[[str], None]):
    """Shared by every session (prompt_toolkit appends each entry as it is sent); in memory if it cannot be kept."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        note(f"input history will not be kept: cannot write {path} ({e.strerror or e}); set MALHAE_HOME to a "
             "writable folder")
        return InMemoryHistory()
    return FileHistory(str(path))


def completer():
    from prompt_toolkit.completion import Completer, Completion, PathCompleter
    from prompt_toolkit.document import Document

    files = PathCompleter(expanduser=True)
    ggufs = PathCompleter(expanduser=True, file_filter=lambda p: os.path.isdir(p) or p.endswith(".gguf"))

    class CommandCompleter(Completer):
        """/commands, then their arguments: template names, setting names, file paths."""

        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            name, space, arg = text.partition(" ")
            if not space:
                for command, (_args, summary) in COMMANDS.items():
                    if command.startswith(name.lower()):
                        yield Completion(command, -len(name), display_meta=summary)
                return
            try:
                command = resolve_command(name)
            except UserError:
                return
            if command in ("/save", "/load", "/read", "/model", "/lora"):
                paths = ggufs if command in ("/model", "/lora") else files
                yield from paths.get_completions(Document(arg, len(arg)), complete_event)
                return
            options: Iterable[str] = ()
            if command == "/template":
                options = templates.all_templates()
            elif command == "/set" and " " not in arg:
                options = (*SETTABLE, "draft", "draft_max")
            for option in options:
                if option.startswith(arg):
                    yield Completion(option, -len(arg))

    return CommandCompleter()


class PromptReader:
    """A terminal prompt: Enter sends unless the text is unfinished (see needs_more); pastes arrive whole."""

    def __init__(self, history, *, color: bool = True, input=None, output=None) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.application.current import get_app
        from prompt_toolkit.enums import DEFAULT_BUFFER
        from prompt_toolkit.filters import Condition, has_focus
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.output.color_depth import ColorDepth
        from prompt_toolkit.styles import Style

        kb = KeyBindings()
        typing = has_focus(DEFAULT_BUFFER)

        @kb.add("enter", filter=typing)
        def _enter(event) -> None:
            buffer = event.current_buffer
            state = buffer.complete_state
            if state is not None and state.current_completion is not None:  # a command picked from the menu
                buffer.complete_state = None
                args = COMMANDS.get(buffer.text.strip(), ("",))[0]
                if args and not args.startswith("["):  # it needs an argument: let it be typed first
                    buffer.insert_text(" ")
                    return
            if needs_more(buffer.text):
                buffer.cursor_position = len(buffer.text)
                buffer.insert_text("\n")
            else:
                buffer.validate_and_handle()

        @kb.add("escape", "enter", filter=typing)
        def _newline(event) -> None:
            event.current_buffer.insert_text("\n")

        @kb.add("c-c", filter=typing)
        def _ctrl_c(event) -> None:
            event.app.exit(exception=InputCancelled() if event.current_buffer.text else KeyboardInterrupt())

        # complete only commands; otherwise prompt_toolkit reserves lines for a menu below every prompt
        typing_command = Condition(lambda: get_app().current_buffer.text.startswith("/"))

        def placeholder():  # not left behind in the scrollback when the prompt ends with Ctrl-C or Ctrl-D
            return [] if get_app().is_done else [("class:placeholder", "메시지를 입력하세요 — /? 도움말")]

        style = Style.from_dict({"prompt": "bold", "continuation": "ansibrightblack", "placeholder": "ansibrightblack"})
        self.session = PromptSession(
            [("class:prompt", PROMPT)], multiline=True, key_bindings=kb, history=history, completer=completer(),
            complete_while_typing=typing_command, prompt_continuation=[("class:continuation", CONTINUATION)],
            placeholder=placeholder if color else None,
            style=style if color else Style([]), color_depth=None if color else ColorDepth.DEPTH_1_BIT,
            search_ignore_case=True, enable_open_in_editor=True, input=input, output=output)

    def read(self) -> str:
        text = self.session.prompt()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal could not decode arrive as lone surrogates
            raise UserError("what was typed is not valid UTF-8 (is the terminal set to UTF-8? `locale` shows it); "
                            "nothing was sent, type it again") from None
        return text


# what one message, or one-shot prompt, read from a pipe may hold: far more than any context (a 1M-token context is
# about 3 MB of Korean), and little enough that `malhae chat < /dev/zero` does not fill the memory
MAX_INPUT = 16 << 20


def too_long(where: str) -> UserError:
    return UserError(f"{where} is longer than {MAX_INPUT >> 20} MB, more than any model's context holds; give a "
                     "shorter text")


class LineReader:
    """Standard input that is not a terminal (a file, a pipe): the same rules as the prompt, no line editing."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.first = True
        self.ended = False  # after an endless line (/dev/zero) there is nothing sensible left to read

    def read(self) -> str:
        if self.ended:
            raise EOFError
        lines: list[str] = []
        size = 0
        while True:
            raw = self.stream.readline(MAX_INPUT + 1 - size)
            size += len(raw)
            if size > MAX_INPUT:
                self.ended = True
                raise too_long("a message on standard input")
            if not raw:
                if lines:
                    return "\n".join(lines)
                raise EOFError
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise UserError("a line of standard input is not valid UTF-8 and was skipped; convert the input "
                                "first, e.g. iconv -f cp949 -t utf-8") from None
            if self.first:
                line, self.first = line.removeprefix("\ufeff"), False
            lines.append(line)
            if not needs_more("\n".join(lines)):
                return "\n".join(lines)
