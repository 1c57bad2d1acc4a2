"""Turn a stream of token bytes into text pieces that are safe to print: whole UTF-8 characters, no stop string.

Byte-level BPE tokens can end in the middle of a character (a Hangul syllable is three bytes, and a token may hold
one or two of them), and a stop string such as "\\n사용자:" usually arrives spread over several tokens. So bytes are
decoded incrementally (incomplete characters wait for the next token), and text that could still turn out to be the
start of a stop string is held back until it is known not to be one. Pure Python, no llama.cpp: unit-testable.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""  # decoded text not yet released: it may be the beginning of a stop string
        self.stopped = False  # a stop string was found; nothing after it is ever released
        self.matched: str | None = None  # which one (servers report it as stop_reason)
        self.text = ""  # everything released so far

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that can be shown now (possibly empty)."""
        if self.stopped:
            return ""
        held = self._held + self._decoder.decode(data)
        if not self._stop:
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
        """Generation ended without a stop string: release what was held, with any dangling bytes as U+FFFD."""
        if self.stopped:
            return ""
        rest = self._held + self._decoder.decode(b"", final=True)
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
        self.text += text
        return text
