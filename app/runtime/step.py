"""What every generated token goes through, and the one spelling of why an answer ended.

Why one module: the engine's single stream, the server's scheduler slots and the remote backend all end answers for
the same reasons (an end token, a stop text, max_tokens, a full context), and the HTTP APIs spell those reasons in
OpenAI's and Ollama's words. Each used to spell and decide them itself, so a fix to one (a stop text split over two
tokens, the last token before a full context) had to be found and made in four places. Now `Step` decides, once per
token, and `StopReason` is the only place that maps the reasons to and from the wire words.

`Step.take` is on the decode loop's hot path (every token, hundreds a second on a GPU): it keeps to local names and
slots, and callers bind it to a local (`take = step.take`) as they bind llama.cpp's functions.
"""

from __future__ import annotations

import ctypes
from enum import Enum

import llama_cpp as lc

from malhae.runtime.stream import TextStream

_is_eog = lc.llama_vocab_is_eog
_to_piece = lc.llama_token_to_piece


class StopReason(str, Enum):
    """Why an answer ended. A `str` Enum, so that it equals, prints and serialises as its value ("eos", …): what
    `malhae ask --json` shows as stats.stop_reason and the tests compare with."""

    EOS = "eos"  # the model's end token
    STOP = "stop"  # a stop text (a template's turn marker, or one the user gave)
    LENGTH = "length"  # max_tokens
    CONTEXT = "context"  # the context is full
    INTERRUPTED = "interrupted"  # the reader stopped it (Ctrl-C, a client gone) or it broke off
    ERROR = "error"  # it failed; the error says why

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:  # f"{reason}" is "eos" on every Python, not "StopReason.EOS"
        return format(self.value, spec)

    @property
    def openai(self) -> str | None:
        """OpenAI's finish_reason; None for an answer that did not finish (it goes out as an error, or not at all)."""
        return _OPENAI.get(self)

    @property
    def ollama(self) -> str | None:
        """Ollama's done_reason; None as for `openai`."""
        return _OLLAMA.get(self)

    @classmethod
    def from_openai(cls, finish_reason: str, *, stop_text: bool, max_tokens: bool) -> StopReason:
        """Read an OpenAI-compatible server's finish_reason back. `stop_text`: the server said (or it must have been)
        a stop text that ended it, since its "stop" means an end token or a stop text alike; `max_tokens`: the request's
        max_tokens was the user's own, not cut to what the context had left, so "length" was max_tokens, not the
        context. Any other word (content_filter, tool_calls) ended the answer as an end token would."""
        if finish_reason == "length":
            return cls.LENGTH if max_tokens else cls.CONTEXT
        return cls.STOP if finish_reason == "stop" and stop_text else cls.EOS


def llama_server_stop_text(verbose: dict, unknown: object) -> object:
    """What llama-server's last chunk (with `verbose`) says ended an answer, as from_openai's stop_text needs it: None
    for its end token (stop_type "eos"), the stop text for a stop word ("word"), `unknown` for anything else."""
    return {"eos": None, "word": verbose.get("stopping_word") or ""}.get(verbose.get("stop_type"), unknown)


_OPENAI = {StopReason.EOS: "stop", StopReason.STOP: "stop", StopReason.LENGTH: "length", StopReason.CONTEXT: "length"}
_OLLAMA = _OPENAI  # Ollama's done_reason uses the same two words


class Step:
    """One answer's per-token step: the end token, stop texts (through a TextStream), and the length limit.

    `max_new` is how many tokens may be generated (max_tokens, or less where the context has less room);
    reaching it ends the answer with LENGTH when that was `max_tokens`, else CONTEXT. `reason` is None while the
    answer goes on. Speculative decoding hands its accepted tokens to `take` one by one, stopping at the first
    that ends the answer, and drafts at most `draft_room` of them."""

    __slots__ = ("vocab", "stream", "n", "max_new", "max_tokens", "min_new", "reason", "_buf")

    def __init__(self, vocab: lc.llama_vocab_p, stop: list[str] | tuple[str, ...], max_new: int,
                 max_tokens: int, *, answer: bool = False, min_new: int = 0) -> None:
        self.vocab = vocab
        # no stop text ends the answer before min_new tokens (the sampler keeps the end token away meanwhile)
        self.min_new = min_new
        self.stream = TextStream(stop, answer=answer)  # answer: a chat answer, shown from its first non-space
        self.n = 0  # tokens generated (an end token is not one)
        self.max_new = max_new
        self.max_tokens = max_tokens
        self.reason: StopReason | None = None if max_new > 0 else self._limit()
        self._buf = ctypes.create_string_buffer(256)  # reused: one allocation per answer, not per token

    def take(self, token: int) -> str:
        """Add a sampled token; return the text to show now (whole characters, never a stop text; often "").
        Sets `reason` when this token ended the answer (an end token is not counted and shows nothing)."""
        vocab = self.vocab
        if _is_eog(vocab, token):
            self.reason = StopReason.EOS
            return ""
        self.n = n = self.n + 1
        buf = self._buf
        size = _to_piece(vocab, token, buf, 256, 0, False)
        stream = self.stream
        text = stream.feed(buf.raw[:size] if size >= 0 else self._long_piece(token, -size), n > self.min_new)
        if stream.stopped:
            self.reason = StopReason.STOP
        elif n >= self.max_new:
            self.reason = self._limit()
        return text

    def finish(self) -> str:
        """The held tail once the answer ended (not at a stop text): text that might have begun a stop text; bytes
        that only begin a character at the cut-off are dropped (TextStream.finish)."""
        return self.stream.finish()

    @property
    def draft_room(self) -> int:
        """How many drafted tokens a verification after the last taken token may accept: they and the sample after
        them must fit in max_new."""
        return self.max_new - self.n - 1

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return self.stream.text

    @property
    def matched(self) -> str | None:
        """The stop text that ended the answer, None if none did."""
        return self.stream.matched

    def _limit(self) -> StopReason:
        return StopReason.LENGTH if self.n >= self.max_tokens else StopReason.CONTEXT

    def _long_piece(self, token: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)  # a piece longer than the reused buffer: none in malhae's models
        return buf.raw[:_to_piece(self.vocab, token, buf, size, 0, False)]
