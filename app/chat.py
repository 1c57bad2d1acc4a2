"""`malhae chat`: an interactive Korean conversation in the terminal, on the same engine as `ask`.

Input is prompt_toolkit: line editing that knows a Hangul syllable is two columns wide (no lexer or other per-character
processing is added, so the terminal's IME composition and the cursor stay as they are), history shared by all
sessions and searchable with Ctrl-R, bracketed paste, completion of /commands. Output is written piece by piece as the
engine yields it and never redrawn, so the terminal costs next to nothing even at hundreds of tokens per second. What
the conversation keeps and what fits in the context is app.conversation's business; this module reads, dispatches and
writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from app import conversation as conv_mod
from app import models, settings, templates
from app.conversation import SETTINGS, Conversation, Prepared, check_setting, parse_setting
from app.engine import Engine, Sampling, Stats, check_model_file
from app.errors import UserError

try:
    import termios
except ImportError:  # pragma: no cover - Windows
    termios = None

CONTINUE = "\\"  # a line ending in it goes on on the next line
BLOCK = '"""'  # opens and closes a block of several lines
PROMPT, CONTINUATION = ">>> ", "... "
QUIT_HINT = "to quit, press Ctrl-D or type /exit (종료: Ctrl-D 또는 /exit)"

COMMANDS: dict[str, tuple[str, str]] = {  # name: (arguments, what it does)
    "/help": ("", "this help (도움말)"),
    "/clear": ("", "forget the conversation and start over (대화 지우기)"),
    "/system": ("[TEXT]", "show or set the system text; /system default restores the template's"),
    "/template": ("[NAME]", "show or switch the prompt format: " + ", ".join(templates.all_templates())),
    "/set": ("KEY VALUE", "change a setting: " + ", ".join(SETTINGS)),
    "/show": ("", "model, template, settings and context use"),
    "/retry": ("", "write the last answer again (다시 쓰기)"),
    "/undo": ("", "take back your last message and its answer (되돌리기)"),
    "/save": ("FILE", "save the conversation as JSON (저장)"),
    "/load": ("FILE", "continue a saved conversation (불러오기)"),
    "/model": ("PATH", "switch to another model; the conversation stays"),
    "/stats": ("", "statistics of the last answer"),
    "/exit": ("", "quit (종료); Ctrl-D does the same"),
}
ALIASES = {"/?": "/help", "/bye": "/exit", "/quit": "/exit"}
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


class Terminated(KeyboardInterrupt):
    """SIGTERM: leave the chat (unlike Ctrl-C, which only stops an answer or clears the line)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


class InputCancelled(Exception):
    """Ctrl-C with text at the prompt: drop that text, as a shell does."""


class Reader(Protocol):
    def read(self) -> str:
        """The next raw input (possibly several lines); EOFError at the end, KeyboardInterrupt for Ctrl-C."""
        ...


def history_path() -> Path:
    """$MALHAE_HOME/chat_history, else the user data directory (~/.local/share/malhae on Linux)."""
    import platformdirs

    home = os.environ.get("MALHAE_HOME")
    return (Path(home).expanduser() if home else Path(platformdirs.user_data_dir("malhae"))) / "chat_history"


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


def _completer():
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
            if command in ("/save", "/load", "/model"):
                paths = ggufs if command == "/model" else files
                yield from paths.get_completions(Document(arg, len(arg)), complete_event)
                return
            options: Iterable[str] = ()
            if command == "/template":
                options = templates.all_templates()
            elif command == "/set" and " " not in arg:
                options = SETTINGS
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
            [("class:prompt", PROMPT)], multiline=True, key_bindings=kb, history=history, completer=_completer(),
            complete_while_typing=typing_command, prompt_continuation=[("class:continuation", CONTINUATION)],
            placeholder=placeholder if color else None,
            style=style if color else Style([]), color_depth=None if color else ColorDepth.DEPTH_1_BIT,
            search_ignore_case=True, enable_open_in_editor=True, input=input, output=output)

    def read(self) -> str:
        return self.session.prompt()


class LineReader:
    """Standard input that is not a terminal (a file, a pipe): the same rules as the prompt, no line editing."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.first = True

    def read(self) -> str:
        lines: list[str] = []
        while True:
            raw = self.stream.readline()
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


# --- writing an answer ------------------------------------------------------------------------------------------

class AnswerInterrupted(KeyboardInterrupt):
    """Ctrl-C while an answer is being written: it stops that answer, not the chat."""


class _CtrlC:
    """While an answer is written, Ctrl-C raises AnswerInterrupted at once, except between writing a piece and
    recording it, so that the conversation keeps exactly what the terminal shows."""

    def __init__(self) -> None:
        self.hold = False
        self.pending = False
        self.previous = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum: int, frame: object) -> None:
        if self.hold:
            self.pending = True
        else:
            raise AnswerInterrupted


class _KeepOutput:
    """On a terminal, Ctrl-C makes the terminal driver throw away output written but not yet displayed (unless
    NOFLSH is set), so the screen would show less than the conversation keeps. NOFLSH is set while an answer is
    written and the terminal's own settings come back afterwards."""

    def __init__(self, stream: TextIO) -> None:
        self.fd: int | None = None
        self.saved: list | None = None
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self.fd = stream.fileno()

    def __enter__(self) -> _KeepOutput:
        if self.fd is None or termios is None:
            return self
        try:
            self.saved = termios.tcgetattr(self.fd)
            changed = list(self.saved)
            changed[3] |= termios.NOFLSH
            termios.tcsetattr(self.fd, termios.TCSANOW, changed)
        except (OSError, termios.error):
            self.saved = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)


class _Waiting:
    """A spinner while the prompt is evaluated (seconds on a CPU after a /load or when old turns were dropped), drawn
    by a thread on the answer's own stream and erased before the first piece is written. It appears only after a
    short delay, so fast answers never flicker."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: TextIO, label: str = "생각 중… (Ctrl-C: 중단)", delay: float = 0.3) -> None:
        self.out, self.label, self.delay = out, label, delay
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        if self.done.wait(self.delay):
            return
        frame = 0
        while True:
            self.out.write(f"\r{self.FRAMES[frame % len(self.FRAMES)]} {self.label}")
            self.out.flush()
            frame += 1
            if self.done.wait(0.1):
                break
        self.out.write("\r\x1b[K")  # erase the line: the answer starts where the spinner was
        self.out.flush()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


FLUSH_EVERY = 0.008  # seconds

# C0/C1 control characters except tab and newline: a model's output must not move the cursor or send escapes
_UNPRINTABLE = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)])


def write_answer(pieces: Iterator[str], out: TextIO, *, terminal: bool) -> tuple[str, bool]:
    """Write pieces as they come, never re-rendering; return (text shown, interrupted).

    Each piece is written at once; the stream is flushed when FLUSH_EVERY has passed since the last flush (so at slow
    speeds every piece, at GPU speeds about 125 times a second: no screen shows more, and a system call and a terminal
    wake-up per token would take CPU time from the model on a small machine). Leading whitespace is not shown (the
    model writes the space after "어시스턴트:"); on a terminal, control characters are not written, and a spinner shows
    while the prompt is evaluated if that takes long. The returned text is what the model wrote from its first shown
    character up to the last piece that was written.
    """
    shown: list[str] = []
    write, flush, clock = out.write, out.flush, time.perf_counter
    flushed = 0.0
    started = interrupted = False
    guard = _CtrlC()
    waiting = None
    try:
        with guard, _KeepOutput(out) if terminal else contextlib.nullcontext():
            try:
                waiting = _Waiting(out) if terminal else None
                for piece in pieces:
                    if waiting is not None:
                        waiting.stop()
                        waiting = None
                    if not started:
                        piece = piece.lstrip()
                        if not piece:
                            continue
                        started = True
                    guard.hold = True
                    write(piece.translate(_UNPRINTABLE) if terminal else piece)
                    now = clock()
                    if now - flushed >= FLUSH_EVERY:
                        flush()
                        flushed = now
                    shown.append(piece)
                    guard.hold = False
                    if guard.pending:
                        raise AnswerInterrupted
            finally:
                guard.hold = True  # the generator's own clean-up must not be cut short
                if waiting is not None:
                    waiting.stop()
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
    except AnswerInterrupted:
        interrupted = True
    interrupted = interrupted or guard.pending
    text = "".join(shown)
    if interrupted or (text and not text.endswith("\n")):
        write("\n")  # after the terminal's ^C echo, or the answer's last line
    flush()  # whatever is still buffered: the screen ends up showing exactly `text`
    return text, interrupted


# --- the REPL ---------------------------------------------------------------------------------------------------

OpenEngine = Callable[[Path, int | None], Engine]


class Chat:
    """One chat session: reads, runs commands, streams answers; the conversation and the engine outlive mistakes."""

    def __init__(self, conversation: Conversation, engine: Engine, *, open_engine: OpenEngine, reader: Reader,
                 out: TextIO, console: Console, terminal: bool, template_fixed: bool = False) -> None:
        self.conv = conversation
        self.engine = engine
        self.open_engine = open_engine
        self.reader = reader
        self.out = out
        self.console = console
        self.terminal = terminal
        self.template_fixed = template_fixed  # chosen by the user: kept when the model changes
        self.last_stats: Stats | None = None
        self.running = True

    # --- loop ---

    def run(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            self.banner()
            while self.running:
                self.step()
        finally:
            self.engine.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def banner(self) -> None:
        e = self.engine
        where = f"{e.n_gpu_layers} GPU layers" if e.n_gpu_layers else "CPU"
        self.dim(f"malhae chat · model {e.name} ({e.path.name}, {where}) · template {self.conv.template.name} · "
                 f"context {e.n_ctx} tokens")
        self.dim("/help for commands (도움말) · Ctrl-C stops an answer · Ctrl-D or /exit quits (종료)")

    def step(self) -> None:
        """One input and what it asks for; every user mistake ends here as one line, and the session goes on."""
        try:
            raw = self.reader.read()
        except EOFError:
            self.running = False
            return
        except InputCancelled:
            return
        except Terminated:
            raise
        except KeyboardInterrupt:
            self.hint(f"Ctrl-C stops an answer while it is written; {QUIT_HINT}")
            return
        except UserError as e:
            self.hint(str(e))
            return
        try:
            kind, text = classify(raw)
            if kind == "command":
                self.command(text)
            elif kind == "message":
                self.say(text)
        except UserError as e:
            self.hint(str(e))
        except Terminated:
            raise
        except KeyboardInterrupt:
            self.hint("interrupted (중단됨)")
        except Exception as e:  # a bug: say so, and keep the conversation (it can still be saved)
            if settings.DEBUG:
                traceback.print_exc()
            self.hint(f"internal error ({type(e).__name__}: {e}); the conversation is kept (/save it); run with "
                      "--debug for the traceback and report it")
        finally:
            self.conv.abandon()  # between inputs every message has its answer, even after a Ctrl-C at a bad moment

    # --- output ---

    def dim(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False, highlight=False, soft_wrap=True)

    def hint(self, message: str) -> None:
        self.console.print(f"malhae: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    # --- answers ---

    def say(self, message: str) -> None:
        prepared = self.conv.ask(message, self.engine.tokenize, self.engine.n_ctx)
        self.write(prepared)

    def write(self, prepared: Prepared) -> None:
        if prepared.dropped:
            self.hint(f"the conversation no longer fits in the context of {self.engine.n_ctx} tokens: forgot the "
                      f"{prepared.dropped} oldest messages (오래된 대화 {prepared.dropped}개를 잊었습니다); "
                      "/set ctx N keeps more")
        engine = self.engine
        before = engine.stats
        try:
            text, interrupted = write_answer(engine.generate(prepared.tokens, self.conv.answer_sampling()), self.out,
                                             terminal=self.terminal)
        except BaseException:
            self.conv.abandon()
            raise
        stats = engine.stats if engine.stats is not before else Stats(prompt_tokens=len(prepared.tokens))
        if interrupted:
            stats.stop_reason = "interrupted"
        self.conv.answer(text.rstrip())
        self.last_stats = stats
        self.status(stats)

    def status(self, s: Stats) -> None:
        parts = [f"{s.generated_tokens} tokens", f"{s.decode_tps:.1f} tok/s",
                 f"context {s.prompt_tokens + s.generated_tokens}/{self.engine.n_ctx}"]
        if s.stop_reason == "interrupted":
            parts.append("interrupted (중단됨)")
        elif s.stop_reason == "length":
            parts.append(f"stopped at max_tokens {self.conv.sampling.max_tokens} (/set max_tokens N for longer)")
        elif s.stop_reason == "context":
            parts.append("context full (문맥이 가득 찼습니다)")
        self.dim(" · ".join(parts))
        self.console.print()

    # --- commands ---

    def command(self, text: str) -> None:
        name, arg = (text.split(None, 1) + [""])[:2]  # the argument may span lines (a backslash continuation)
        getattr(self, "cmd_" + resolve_command(name)[1:])(arg.strip())

    def cmd_help(self, arg: str) -> None:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold" if self.console.color_system else None, no_wrap=True)
        table.add_column()
        for name, (args, summary) in COMMANDS.items():
            table.add_row(escape(f"{name} {args}".strip()), escape(summary))
        self.console.print(table)
        self.dim(KEYS)

    def cmd_exit(self, arg: str) -> None:
        self.running = False

    def cmd_clear(self, arg: str) -> None:
        self.conv.clear()
        self.info("conversation cleared (대화를 지웠습니다)")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            origin = "the template's" if self.conv.system is None else "yours"
            shown = self.conv.system_text or "(none)"
            self.info(f"system text ({origin}): {shown}")
            return
        self.conv.system = None if arg == "default" else arg
        what = "the template's own" if arg == "default" else "set"
        self.info(f"system text {what}; it applies from the next answer")

    def cmd_template(self, arg: str) -> None:
        if not arg:
            for t in templates.all_templates().values():
                mark = "*" if t.name == self.conv.template.name else " "
                self.info(f"{mark} {t.name:<9} {t.description}")
            self.dim("switch with /template NAME")
            return
        self.conv.template = templates.get(arg)
        self.template_fixed = True
        self.info(f"template {arg}: {self.conv.template.description}")

    def cmd_set(self, arg: str) -> None:
        key, _, raw = arg.partition(" ")
        key = key.lower().replace("-", "_")  # /set top-p 0.9 as the command-line option is spelled
        if not key:
            self.info(self._settings_line())
            self.dim("change one with /set KEY VALUE, e.g. /set temperature 0.2")
            return
        if key not in SETTINGS:
            raise UserError(f"unknown setting {key!r}; the settings are: {', '.join(SETTINGS)}")
        if not raw.strip():
            raise UserError(f"give a value: /set {key} {SETTINGS[key].example}")
        value = parse_setting(key, raw)
        if key == "ctx":
            self._reopen(self.engine.path, value)
            self.conv.ctx = value
            self.info(f"context is now {self.engine.n_ctx} tokens (the model was loaded again)")
            return
        setattr(self.conv.sampling, key, value)
        self.info(f"{key} = {'random' if value is None else _number(value)}")

    def cmd_show(self, arg: str) -> None:
        e, c = self.engine, self.conv
        where = f"{e.n_gpu_layers} GPU layers" if e.n_gpu_layers else f"CPU, {e.threads} threads"
        system = c.system_text.replace("\n", " ") or "(none)"
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column()
        used = c.context_used(e.tokenize)
        for label, value in (("model", f"{e.name} — {e.path} ({where})"),
                             ("template", f"{c.template.name} — {c.template.description}"),
                             ("system", f"{system} ({'the template' if c.system is None else 'yours'})"),
                             ("settings", self._settings_line()),
                             ("context", f"{used}/{e.n_ctx} tokens used, {c.exchanges} exchanges")):
            table.add_row(label, escape(value))
        self.console.print(table)

    def _settings_line(self) -> str:
        s = self.conv.sampling
        values = {key: getattr(s, key) for key in SETTINGS if key != "ctx"}
        values["seed"] = "random" if s.seed is None else s.seed
        values["ctx"] = self.engine.n_ctx
        return " · ".join(f"{k} {_number(v)}" for k, v in values.items())

    def cmd_retry(self, arg: str) -> None:
        self.write(self.conv.retry(self.engine.tokenize, self.engine.n_ctx))

    def cmd_undo(self, arg: str) -> None:
        _, message = self.conv.undo()
        short = message.replace("\n", " ")
        short = short if len(short) <= 40 else short[:39] + "…"
        self.info(f"took back: {short} (되돌렸습니다)")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UserError("give a file name: /save chat.json")
        path = conv_mod.save(self.conv, Path(arg), self.engine.name)
        self.info(f"saved {self.conv.exchanges} exchanges to {path} (저장했습니다)")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UserError("give a file saved with /save: /load chat.json")
        loaded, model = conv_mod.load(Path(arg), self.conv.template)
        loaded.ctx = self.conv.ctx  # the context size belongs to the running engine, not to the file
        self.conv = loaded
        self.template_fixed = True
        self.info(f"loaded {loaded.exchanges} exchanges from {arg} (template {loaded.template.name}) (불러왔습니다)")
        if model and model != self.engine.name:
            self.dim(f"it was saved with model {model}; continuing with {self.engine.name}")

    def cmd_model(self, arg: str) -> None:
        if not arg:
            raise UserError("give a model file or a name from `malhae models`: /model path/to/model.gguf")
        self._reopen(models.resolve(arg), self.conv.ctx)
        if not self.template_fixed:
            self.conv.template = templates.for_engine(self.engine)
        self.info(f"model {self.engine.name} ({self.engine.path.name}) · template {self.conv.template.name} · "
                  f"context {self.engine.n_ctx} tokens; the conversation stays")

    def cmd_stats(self, arg: str) -> None:
        s = self.last_stats
        if s is None:
            raise UserError("no answer yet: send a message first")
        evaluated = s.prompt_tokens - s.cached_tokens
        self.info(f"answer: {s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s, stop: {s.stop_reason or '-'}")
        self.info(f"prompt: {s.prompt_tokens} tokens, {s.cached_tokens} cached (reused from the last turn), "
                  f"{evaluated} evaluated at {s.prompt_tps:.0f} tok/s")
        self.info(f"first token after {s.ttft * 1000:.0f} ms")

    def _reopen(self, path: Path, n_ctx: int | None) -> None:
        """Load a model (or the same one with another context); if that fails, the one that worked comes back."""
        check_model_file(path)  # the common mistakes, before the running engine is given up
        old_path, old_ctx = self.engine.path, self.conv.ctx
        self.engine.close()
        try:
            with self.console.status(f"loading {path.name}…"):
                self.engine = self.open_engine(path, n_ctx)
        except BaseException:
            self.engine = self.open_engine(old_path, old_ctx)
            raise


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def open_chat(*, model: str | None, template: str | None = None, system: str | None = None,
              sampling: Sampling | None = None, ctx: int | None = None, threads: int | None = None,
              gpu_layers: str = "auto", no_color: bool = False, verbose: bool = False, reader: Reader | None = None,
              out: TextIO | None = None, console: Console | None = None) -> Chat:
    """Check the options, load the model, pick the template; the reader, output and console default to the
    process's own (a prompt on a terminal, plain lines from a pipe)."""
    sampling = sampling or Sampling()
    no_color = no_color or bool(os.environ.get("NO_COLOR"))
    if console is None:
        console = Console(file=sys.stderr, highlight=False, soft_wrap=True, color_system=None if no_color else "auto")

    def note(message: str) -> None:
        console.print(f"malhae: {message}", style="dim", markup=False, highlight=False, soft_wrap=True)

    for key in SETTINGS:
        value = ctx if key == "ctx" else getattr(sampling, key)
        check_setting(key, value, f"--{key.replace('_', '-')} {value}")
    chosen = templates.get(template) if template else None
    path = models.resolve(model, note)

    def open_engine(p: Path, n_ctx: int | None) -> Engine:
        return Engine(p, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, verbose=verbose, notify=note)

    with console.status(f"loading {path.name}…"):
        engine = open_engine(path, ctx)
    try:
        conversation = Conversation(chosen or templates.for_engine(engine), sampling, ctx, system)
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
        return Chat(conversation, engine, open_engine=open_engine, reader=reader, out=out, console=console,
                    terminal=out.isatty(), template_fixed=chosen is not None)
    except BaseException:
        engine.close()
        raise


def run(**options) -> None:
    """`malhae chat`: talk until Ctrl-D or /exit."""
    open_chat(**options).run()
