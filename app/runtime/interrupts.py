"""Ctrl-C and SIGTERM while llama.cpp works: a flag that its callbacks answer with, raised once Python is in charge.

llama.cpp calls back into Python while it loads (its log), computes (the importance matrix's eval callback) and
between graph nodes (the abort callback). Python raises KeyboardInterrupt at whatever bytecode runs next, which is
then inside such a callback; ctypes prints the exception and swallows it, and the work goes on. In a trial of about
130 Ctrl-C presses, 5 conversions ran on to the end and exited 0. Hence: no callback may raise (`caught`,
`abort_callback`), and wherever llama.cpp may call back the signals are held as a flag (`Interrupts`).
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Callable

import llama_cpp as lc


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM held as a flag while llama.cpp calls back into Python, raised afterwards.

    Inside the block the signals only set `pending`; llama.cpp is asked to stop through its abort callback
    (Context(abort=…)); the interrupt is raised where Python is in charge again (`check()`, and at the end of the
    block). Main thread only (elsewhere the block does nothing); a signal the process ignores stays ignored.

    Signals belong to the process, so the flag does too: blocks nest and share it, and only the outermost one swaps
    the handlers (a Ctrl-C while `malhae convert` loads the model for --imatrix auto stops the calibration's first
    decode). A second signal while one is pending is raised at once, as Python would: the way out should something
    not reach a check (its clean-up may be cut short then; files.sweep removes what that leaves). `finished()` says
    the result is in place: a signal from then to the end of the outermost block comes too late to undo it and is
    dropped, so that an interrupted run has always left nothing behind."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    _depth = 0  # blocks open on the main thread
    _pending = False
    _late = False
    _missed = False  # a Ctrl-C a callback caught while no block was open (deliver raises it)
    _previous: dict[int, object] = {}

    def __init__(self) -> None:
        self._counted = False

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            if Interrupts._depth == 0:
                for sig in self.SIGNALS:
                    if signal.getsignal(sig) is not signal.SIG_IGN:
                        Interrupts._previous[sig] = signal.signal(sig, Interrupts._hold)
            Interrupts._depth += 1
            self._counted = True
        return self

    @staticmethod
    def _hold(signum: int, frame: object) -> None:
        if Interrupts._late:
            return
        if Interrupts._pending:
            raise KeyboardInterrupt
        Interrupts._pending = True

    @staticmethod
    def caught(error: BaseException) -> None:
        """What a ctypes callback does with an exception it must not let out: a KeyboardInterrupt (a second Ctrl-C,
        raised at once) becomes the pending flag of the open block. Outside any block (chat, ask, serve and eval load
        models without one) it is kept as missed, for `deliver` to raise once llama.cpp has returned: delivered again
        at once (`_thread.interrupt_main`), it was raised in the callback again and lost. Anything else is dropped."""
        if not isinstance(error, KeyboardInterrupt) or Interrupts._late:
            return
        if Interrupts._depth:
            Interrupts._pending = True
        else:
            Interrupts._missed = True

    @staticmethod
    def deliver() -> None:
        """Raise the Ctrl-C a callback caught outside any block; called where llama.cpp hands control back (after a
        model load, a context's creation, a decode)."""
        if Interrupts._missed:
            Interrupts._missed = False
            raise KeyboardInterrupt

    @property
    def pending(self) -> bool:
        return Interrupts._pending and not Interrupts._late

    def __call__(self) -> bool:
        return self.pending

    def check(self) -> None:
        if self.pending:
            Interrupts._pending = False  # raised once: whoever catches it may go on
            raise KeyboardInterrupt

    def finished(self) -> None:
        """The work is done and in place: drop any signal from now to the end of the outermost block."""
        if self._counted:
            Interrupts._late, Interrupts._pending = True, False

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._counted:
            return
        self._counted = False
        Interrupts._depth -= 1
        if Interrupts._depth == 0:
            for sig, handler in Interrupts._previous.items():
                signal.signal(sig, handler)
            Interrupts._previous.clear()
            held = exc_type is None and self.pending
            Interrupts._pending = Interrupts._late = False
            if held:
                raise KeyboardInterrupt
        elif exc_type is None:
            self.check()


def abort_callback(abort: Callable[[], bool]) -> object:
    """llama.cpp's abort callback around `abort` (keep it alive as long as the context): asked between graph nodes,
    it must never raise; a failing `abort` stops the decode, as a stop it could not ask about."""

    def ask(_data: ctypes.c_void_p) -> bool:
        try:
            return bool(abort())
        except BaseException as e:  # noqa: BLE001 - raising here would be printed and swallowed by ctypes
            Interrupts.caught(e)
            return True

    return lc.ggml_abort_callback(ask)
