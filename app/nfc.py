"""Text in Unicode's composed form (NFC) before it is tokenized: the one rule for what users give malhae.

Text from macOS file names, some PDFs and web pages arrives decomposed (NFD: 대 as the jamo ᄃ + ᅢ). The models were
trained on composed text, and their tokenizers (byte-level BPE, no normalizer: llama.cpp applies none) read jamo as
rare bytes: `대한민국의 주권은 국민에게 있고, …` is 10 tokens of the demo model in NFC and 222 in NFD, and the answer
to an NFD prompt is nonsense. So prompts, documents, chat input and server messages are composed first; NFC only
joins what was split (and maps the few CJK compatibility ideographs to their unified forms), it never drops text.

Not composed, on purpose: a perplexity text (its number measures the text as given, as llama-perplexity's does: only
a warning) and token ids (they are the client's, exactly). The cost is negligible next to tokenizing: the check
(`unicodedata.is_normalized`) scans without copying, and only a text that fails it is copied (README, "Hangul in
NFC", has the numbers).
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Callable

Notify = Callable[[str], None]

WHAT = ("not in Unicode's composed form (NFC): decomposed Hangul (ᄃ+ᅢ for 대), as macOS file names and some PDFs "
        "give it")
CONVERT = ("python3 -c 'import sys, unicodedata; sys.stdout.write(unicodedata.normalize(\"NFC\", sys.stdin.read()))'"
           " < IN > OUT")


def compose(text: str, where: str = "", notify: Notify | None = None) -> str:
    """`text` in NFC: the same object when it already is (the usual case, checked without a copy); otherwise the
    composed copy, and `notify` hears once, for this text, what `where` held and that it was converted."""
    if unicodedata.is_normalized("NFC", text):
        return text
    composed = unicodedata.normalize("NFC", text)
    if notify is not None:
        notify(f"{where} is {WHAT}; the model reads it composed, the form it was trained on ({len(text):,} → "
               f"{len(composed):,} characters)")
    return composed


def warn_as_given(text: str, where: str, notify: Notify | None) -> None:
    """For a text that is measured, not answered (perplexity): kept as given, but said when it is not NFC, since the
    number then measures the decomposed text (many more, rarer tokens), which is seldom what was meant."""
    if notify is not None and not unicodedata.is_normalized("NFC", text):
        notify(f"{where} is {WHAT}; its perplexity is measured on the text as given (as llama-perplexity measures "
               f"it), not composed; to measure the composed text, convert it first: {CONVERT}")


class Once:
    """A notify that passes on only its first message: a chat session, or a server, says once that it converts,
    not at every message or request. Thread-safe (server requests tokenize in threads)."""

    def __init__(self, notify: Notify | None) -> None:
        self.notify = notify
        self.said = False
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            if self.said or self.notify is None:
                return
            self.said = True
        self.notify(message)
