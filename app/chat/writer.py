"""Writing an answer in `malhae chat` as the engine yields it: never redrawn, Ctrl-C-safe, no terminal escapes.

Output is written piece by piece and never re-rendered, so the terminal costs next to nothing even at hundreds of
tokens per second. Ctrl-C stops the answer (not the chat) and the conversation keeps exactly what the screen shows:
that takes a SIGINT guard around each write and, on a terminal, NOFLSH so the driver does not discard what was written.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from malhae.errors import UserError
from malhae.ui import printable

try:
    import termios
except ImportError:  # pragma: no cover - Windows
    termios = None


class AnswerInterrupted(KeyboardInterrupt):
    """Ctrl-C while an answer is being written: it stops that answer, not the chat."""


class AnswerBroken(UserError):
    """The answer failed after part of it was shown (a server's stream cut off): `text` is what the screen shows,
    which the conversation keeps, as after a Ctrl-C."""

    def __init__(self, error: UserError, text: str) -> None:
        super().__init__(str(error), exit_code=error.exit_code)
        self.text = text


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


class _AnswerTerminal:
    """The terminal's settings while an answer is written, restored afterwards.

    NOFLSH: on Ctrl-C the driver would throw away output written but not yet displayed, so the screen would show
    less than the conversation keeps. ECHO off: prompt_toolkit has handed the terminal back to its normal mode, whose
    driver echoes every key typed meanwhile into the answer ("…구성합니다/exit"); what is typed is kept, unseen, and
    appears at the next prompt as typed-ahead input."""

    def __init__(self, stream: TextIO) -> None:
        self.fd: int | None = None
        self.saved: list | None = None
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self.fd = stream.fileno()

    def __enter__(self) -> _AnswerTerminal:
        if self.fd is None or termios is None:
            return self
        try:
            self.saved = termios.tcgetattr(self.fd)
            changed = list(self.saved)
            changed[3] = (changed[3] | termios.NOFLSH) & ~termios.ECHO
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


def write_answer(pieces: Iterator[str], out: TextIO, *, terminal: bool) -> tuple[str, bool]:
    """Write pieces as they come, never re-rendering; return (text shown, interrupted).

    Each piece is written at once; the stream is flushed when FLUSH_EVERY has passed since the last flush (so at slow
    speeds every piece, at GPU speeds about 125 times a second: no screen shows more, and a system call and a terminal
    wake-up per token would take CPU time from the model on a small machine). On a terminal, control characters are
    not written, and a spinner shows while the prompt is evaluated if that takes long. The returned text is what was
    written, up to the last piece (the answer's leading space is already gone: Sampling.answer).
    """
    shown: list[str] = []
    write, flush, clock = out.write, out.flush, time.perf_counter
    flushed = 0.0
    interrupted = False
    broken: UserError | None = None
    guard = _CtrlC()
    waiting = None
    try:
        with guard, _AnswerTerminal(out) if terminal else contextlib.nullcontext():
            try:
                waiting = _Waiting(out) if terminal else None
                for piece in pieces:
                    if waiting is not None:
                        waiting.stop()
                        waiting = None
                    guard.hold = True
                    write(printable(piece, multiline=True) if terminal else piece)
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
    except UserError as e:
        if not shown:
            raise
        broken = e
    interrupted = interrupted or guard.pending
    text = "".join(shown)
    if interrupted or (text and not text.endswith("\n")):
        write("\n")  # after the terminal's ^C echo, or the answer's last line
    flush()  # whatever is still buffered: the screen ends up showing exactly `text`
    if broken is not None:
        raise AnswerBroken(broken, text)
    return text, interrupted


def write_oneshot(run) -> None:
    """`complete` and `ask`: write pieces as they come, raw text on stdout (no markup, no colour), then a dim status
    line on a terminal. On a terminal, control characters a model (or a remote server) wrote are left out, as in
    chat: an answer must not move the cursor or retitle the window; a pipe gets the text as generated."""
    write, flush = sys.stdout.write, sys.stdout.flush
    terminal = sys.stdout.isatty()
    ended_with_newline = True
    try:
        for piece in run.pieces():
            write(printable(piece, multiline=True) if terminal else piece)
            flush()
            ended_with_newline = piece.endswith("\n")
    finally:  # also when the answer breaks off (Ctrl-C, a stream cut): the error goes on a line of its own
        if not ended_with_newline:
            write("\n")
        flush()
    from malhae.ui import err

    if err.is_terminal:
        s = run.stats
        err.print(f"[dim]{s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s, prompt {s.prompt_tokens} tokens "
                  f"({s.prompt_tps:.0f} tok/s), first token {s.ttft * 1000:.0f} ms, stop: {s.stop_reason}[/dim]")
