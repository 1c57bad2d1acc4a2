"""Turn a stream of token bytes into text pieces that are safe to print: whole UTF-8 characters, no stop string.

Byte-level BPE tokens can end in the middle of a character (a Hangul syllable is three bytes, and a token may hold
one or two of them), and a stop string such as "\\n사용자:" usually arrives spread over several tokens. So bytes are
decoded incrementally (incomplete characters wait for the next token), and text that could still turn out to be the
start of a stop string is held back until it is known not to be one. Pure Python, no llama.cpp: unit-testable.

Two rules about the ends of an answer live here too, because every way of generating (the engine, the server's
slots, the remote backend) releases its text through this class and nowhere else:
- when generation ends (any reason), bytes that only begin a character at the very end are dropped, not shown as
  U+FFFD: the token that would have completed the character never came (llama-server does the same);
- an answer to a chat prompt (`answer=True`) starts at its first non-space character: the prompt format ends with
  "어시스턴트:" or "### 답변:" and the model writes the space after it. The model saw that space; the caller's
  template puts it back when the answer is replayed as history (Template.prompt), so the next prompt is unchanged.
"""

from __future__ import annotations

import codecs

# Continuations that complete any valid beginning of a UTF-8 character (the second byte of E0, ED, F0 and F4 has a
# narrower range than 80..BF): used once per answer, to tell such a beginning from bytes that are never valid.
_COMPLETIONS = (b"\x80\x80\x80", b"\x90\x80\x80", b"\xa0\x80\x80")


def _begins_character(data: bytes) -> bool:
    """Whether more bytes could make `data` (at most 3, held by the decoder) one valid character."""
    for tail in _COMPLETIONS:
        for k in range(1, 4):
            try:
                (data + tail[:k]).decode("utf-8")
                return True
            except UnicodeDecodeError:
                continue
    return False


class TextStream:
    def __init__(self, stop: list[str] | tuple[str, ...] = (), *, answer: bool = False) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""  # decoded text not yet released: it may be the beginning of a stop string
        self._leading = answer  # still dropping the whitespace the prompt format leaves before an answer
        self.stopped = False  # a stop string was found; nothing after it is ever released
        self.matched: str | None = None  # which one (servers report it as stop_reason)
        self.text = ""  # everything released so far

    def feed(self, data: bytes, match: bool = True) -> str:
        """Add a token's bytes; return the text that can be shown now (possibly empty). `match` False: no stop
        string ends the text yet (a server's min_tokens), everything decoded is released."""
        if self.stopped:
            return ""
        held = self._held + self._decoder.decode(data)
        if not self._stop or not match:
            self._held = ""
            return self._release(held)
        found = [(i, s) for i, s in ((held.find(s), s) for s in self._stop) if i >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.stopped = True
            self._held = ""
            return self._release(held[:cut])
        keep = self._longest_stop_prefix_suffix(held)
        self._held = held[len(held) - keep:] if keep else ""
        return self._release(held[: len(held) - keep])

    def finish(self) -> str:
        """Generation ended without a stop string: release what was held. Bytes that begin a character at the very
        end are dropped (the rest of it was never generated: a broken character at the cut-off); bytes that no
        continuation could make valid still read U+FFFD, as invalid bytes elsewhere do."""
        if self.stopped:
            return ""
        dangling = self._decoder.getstate()[0]
        rest = self._held + ("" if dangling and _begins_character(dangling)
                             else self._decoder.decode(b"", final=True))
        self._decoder.reset()
        self._held = ""
        return self._release(rest)

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, text: str) -> str:
        if self._leading:
            text = text.lstrip()
            if not text:
                return ""
            self._leading = False
        self.text += text
        return text
