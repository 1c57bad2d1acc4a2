"""Documents handed to a question: `cat 계약서.txt | malhae ask "…"`, `--file`, and chat's /read.

One rule for every text that arrives as bytes (standard input, a document file): bounded in size before it is read
(MAX_INPUT: far more than any context, little enough that /dev/zero does not fill the memory), text and not binary,
valid UTF-8 — and each failure is one line that names where the bytes came from and how to fix them; then composed
(app.nfc: decomposed Hangul, as macOS and some PDFs give it, is many more tokens). A document goes before the
question, separated by a blank line, as people paste a text and then ask about it.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from malhae import files, nfc
from malhae.chat.reader import MAX_INPUT, too_long
from malhae.errors import UserError

SEPARATOR = "\n\n"  # between documents, and between the last one and the question
STDIN = "standard input"


@dataclass(frozen=True)
class Document:
    name: str  # what the user called it (the path as given, or "standard input"): errors and listings show it
    text: str


def decode(data: bytes, where: str, notify: nfc.Notify | None = None) -> str:
    """`data` as text: UTF-8 without a byte-order mark and trailing newlines, in NFC (app.nfc: decomposed Hangul
    composed, `notify` told so once for this text), or UserError naming `where`.

    A UTF-16 file (Windows' "Unicode", which starts with its byte-order mark) gets its own iconv hint. NUL bytes are
    refused before decoding: they are valid UTF-8, so an executable or an image would otherwise reach the model as
    text."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # never valid UTF-8
        raise UserError(f"{where} is UTF-16 text, not UTF-8; convert it first, e.g. iconv -f utf-16 -t utf-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(f"{where} is binary, not text (a NUL byte at offset {nul}); give UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise files.not_utf8(where, data, e) from None
    return nfc.compose(text.removeprefix("\ufeff").rstrip("\r\n"), where, notify)


def piped_stdin() -> BinaryIO | None:
    """Standard input when it is a pipe or a file to read from, else None: a terminal, a closed one, or a stand-in
    that cannot be read (pytest's, whose read() raises; readable() says so)."""
    stdin = sys.stdin
    try:
        if stdin is None or stdin.isatty() or not stdin.readable():
            return None
    except (OSError, ValueError):  # closed
        return None
    return stdin.buffer


def read_stream(stream: BinaryIO, where: str = STDIN, notify: nfc.Notify | None = None) -> str:
    """A binary stream's text (decode's rules), reading at most MAX_INPUT + 1 bytes: `< /dev/zero` is an error,
    not a full memory. May be empty."""
    data = stream.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise too_long(where)
    return decode(data, where, notify)


def read_document(path: Path | str, notify: nfc.Notify | None = None) -> Document:
    """The text of a document file, named as the user gave it; every reason it cannot be used is one UserError.

    app.files.read_bytes does the opening: a regular file only (a FIFO would block, a device never end), its size
    checked before a byte is read, at most MAX_INPUT + 1 bytes read."""
    name = str(path)
    try:
        data = files.read_bytes(Path(path).expanduser(), MAX_INPUT)
    except OSError as e:
        if e.errno == errno.EFBIG:  # said as standard input's limit is: in what a context holds
            raise too_long(name) from None
        pipe = e.errno == errno.EINVAL  # a FIFO, a device, a socket
        raise files.cannot_read(e, name, fix="to read from a pipe, send it to standard input (cmd | malhae ask …)"
                                if pipe else "give a text file") from None
    text = decode(data, name, notify)
    if not text.strip():
        raise UserError(f"{name} is empty: there is nothing in it to read")
    return Document(name, text)


def join(documents: Iterable[Document], text: str | None) -> str:
    """What the model is given: the documents in order, then the question (or continuation text), a blank line
    between each."""
    return SEPARATOR.join([*(d.text for d in documents), *([text] if text is not None else [])])


def sizes(documents: Iterable[Document], tokenize: Callable[[str], list[int]]) -> str:
    """"계약서.txt 3,120 tokens, standard input 45 tokens": what each document takes, for a message saying why a
    prompt is long."""
    return ", ".join(f"{d.name} {len(tokenize(d.text)):,} tokens" for d in documents)
