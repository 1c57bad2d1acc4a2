"""Where malhae keeps its files, and how it writes any file: whole or not at all.

Where: `$MALHAE_HOME` (settings, store, history together, as tests and portable installs want), else the platform's
user folders (platformdirs). This is the only place that reads MALHAE_HOME.

How: every file malhae writes — a converted GGUF, a copy into the store, config.toml, a saved chat — is first written
to a hidden `.NAME.PID[.STEP].partial` file beside its target and renamed over it only when complete, so a reader sees
the old file or the new one, never half of one. Ctrl-C and SIGTERM remove the partial file, but `kill -9`, an
out-of-memory kill or a power cut cannot, and a GGUF is gigabytes; so the next write into the same folder removes the
leftovers whose process is gone (sweep). Two guards keep that from touching a write in progress: the PID in the name
must not be running, and the file must have been untouched for STALE_SECONDS (a live write updates it continuously) —
the second guard matters on a folder shared with other machines, where a PID says nothing.

Reading: a file the user names must be a regular file of a sane size (read_bytes), and JSON or TOML that malhae did
not write is parsed with bounds on nesting, integers and strings (parse_json, parse_toml).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from malhae.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PARTIAL = re.compile(r"^\..+\.(\d+)(?:\.[a-z]+)?\.partial$")
STALE_SECONDS = 600


# --- where -------------------------------------------------------------------------------------------------------

def home() -> Path | None:
    """$MALHAE_HOME, when set: one folder for everything malhae keeps (created when needed, never a file)."""
    value = os.environ.get("MALHAE_HOME")
    if not value:
        return None
    path = Path(value).expanduser()
    kind = not_regular(path) if path.exists() else "a directory"
    if kind != "a directory":
        raise UserError(f"MALHAE_HOME={value} is {kind or 'a file'}, not a folder; point it at a folder (it is "
                        "created when needed) or unset it")
    return path


def data_dir() -> Path:
    """The store and the chat history: $MALHAE_HOME, else the user data folder (~/.local/share/malhae on Linux)."""
    import platformdirs

    return home() or Path(platformdirs.user_data_dir("malhae"))


def config_dir() -> Path:
    """config.toml: $MALHAE_HOME, else the user config folder (~/.config/malhae on Linux)."""
    import platformdirs

    return home() or Path(platformdirs.user_config_dir("malhae"))


def cache_dir() -> Path:
    """What can be made again (the prompt cache): $MALHAE_HOME/cache, else the user cache folder (~/.cache/malhae)."""
    import platformdirs

    found = home()
    return found / "cache" if found else Path(platformdirs.user_cache_dir("malhae"))


# --- what may be written over ------------------------------------------------------------------------------------

def not_regular(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file ("a directory", "a character device" …), else None."""
    try:
        return _kind(path.stat().st_mode)
    except OSError:
        return None


def _kind(mode: int) -> str | None:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_target(path: Path, force: bool, *, replace_hint: str = "add --force to replace it",
                 other_hint: str = "choose another name") -> None:
    """The one rule for every file malhae writes: a new path, or a regular file only when told (`force`).

    Writing goes through a partial file renamed over the target (see `partial`), so a device, a FIFO or a socket
    would not be written *into* but replaced by a regular file — as root, `-o /dev/null --force` replaced the
    system's /dev/null. So anything but a regular file (followed through symlinks) is refused, --force or not, and
    the folder must exist. UserError with the hints the caller's command uses.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; {other_hint}") from None
    if st is not None:
        kind = _kind(st.st_mode)
        if kind:
            raise UserError(f"{path} is {kind}; malhae writes only regular files, so {other_hint}")
        if not force:
            raise UserError(f"{path} already exists; {replace_hint}, or {other_hint}")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {parent} does not exist; create it first or {other_hint}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: the folder {parent} is not writable; {other_hint}")


# --- what may be read -----------------------------------------------------------------------------------------

def read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; OSError (strerror says why) for the caller to word.

    A settings file or a saved chat that is a FIFO would block malhae forever, and /dev/zero would fill the memory;
    so the file is opened without blocking, and what it is and its size are checked before anything is read."""
    kind = _kind(os.stat(path).st_mode)  # first: a socket cannot even be opened
    if kind and kind != "a directory":
        raise OSError(errno.EINVAL, f"it is {kind}, not a regular file", str(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)  # again: what was opened, if the path changed in between
        kind = _kind(st.st_mode)
        if kind == "a directory":
            raise IsADirectoryError(errno.EISDIR, "it is a directory", str(path))
        if kind:
            raise OSError(errno.EINVAL, f"it is {kind}, not a regular file", str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1) if st.st_size <= limit else b""
        if st.st_size > limit or len(data) > limit:
            raise OSError(errno.EFBIG, f"it is larger than such a file can be ({limit:,} bytes)", str(path))
        return data
    finally:
        os.close(fd)


def read_text(path: Path, limit: int) -> str:
    """read_bytes, as UTF-8 (UnicodeDecodeError for the caller to word)."""
    return read_bytes(path, limit).decode("utf-8")


# --- what a user is told when a file cannot be read ----------------------------------------------------------------

class MissingFile(UserError):
    """cannot_read's error for a file that does not exist: a UserError like the others, and its own class so that a
    caller for whom absence is normal (no settings file means the defaults) catches just that."""


def read_user_text(path: Path, what: str, *, limit: int, fix: str = "", verb: str = "read") -> str:
    """The UTF-8 text of a file the user named, or one UserError line in the project's one wording (cannot_read,
    not_utf8): "cannot read settings file /x/config.toml: it is a directory; FIX".

    `what` names the file before its path ("settings file"; "" when the path says enough), `fix` (what to do
    instead) ends every message, `verb` replaces "read" where the caller's other messages say "load"."""
    data = read_user_bytes(path, what, limit=limit, fix=fix, verb=verb)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(_label(path, what), data, e, fix) from None


def read_user_bytes(path: Path, what: str, *, limit: int, fix: str = "", verb: str = "read") -> bytes:
    """read_bytes with read_user_text's messages, for files whose bytes are parsed as a format (JSON, a binary
    file): their decoding fails as that format, with the format's own message."""
    try:
        return read_bytes(path, limit)
    except OSError as e:
        raise cannot_read(e, path, what, fix=fix, verb=verb) from None


def cannot_read(error: OSError, path: Path | str, what: str = "", *, fix: str = "", verb: str = "read") -> UserError:
    """The one wording of an OSError met reading a file, for read_user_bytes and for callers that open a file
    themselves (a stream, a header): every command says a missing file, a folder or a permission the same way.

    A missing file says both "does not exist" and "no such file": the words people search for. read_bytes' own
    errors (too large, not a regular file) already say why in their strerror."""
    where = _label(path, what)
    if isinstance(error, FileNotFoundError):
        return MissingFile(_with_fix(f"cannot {verb} {where}: it does not exist (no such file)", fix))
    if isinstance(error, IsADirectoryError):
        reason = "it is a directory"
    elif isinstance(error, PermissionError):
        reason = f"permission denied (ls -l {path} shows who may read it)"
    else:
        reason = error.strerror or str(error)
    return UserError(_with_fix(f"cannot {verb} {where}: {reason}", fix))


def not_utf8(where: str, data: bytes, error: UnicodeDecodeError, fix: str = "") -> UserError:
    """The one wording of bytes that are not UTF-8 (`where`: "text file /x/t.txt", "standard input"): the first bad
    byte and where it is, and the conversion that fixes the usual cause, a file saved as EUC-KR/CP949."""
    return UserError(_with_fix(f"{where} is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
                               "convert it first, e.g. iconv -f cp949 -t utf-8 (EUC-KR/CP949 files are common)", fix))


def _label(path: Path | str, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _with_fix(message: str, fix: str) -> str:
    return f"{message}; {fix}" if fix else message


# --- what is parsed ----------------------------------------------------------------------------------------------

MAX_DEPTH = 100  # arrays and objects inside each other: real files nest a handful of levels
MAX_INT_BITS = 64  # TOML's integers are 64-bit; no id, count or size in a JSON file malhae reads is wider
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_TOML_SKIPPED = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"|\'[^\'\n]*\'|#[^\n]*')
_BRACKET = re.compile(r"[\[\]{}]")
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")
_LONG_NUMBER = re.compile(r"[0-9][0-9_]{20,}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _TooWide(ValueError):
    """A JSON integer wider than MAX_INT_BITS, raised from inside json's parser (its parse_int hook)."""


def parse_json(data: bytes | str, where: str, fix: str = "") -> object:
    """JSON that malhae did not write itself — a checkpoint's config.json and tokenizer.json, a saved chat, a KoBEST
    row, a server's answer — or one UserError line: "WHERE is not valid JSON (…); FIX".

    Python's parser trusts its input: `[[[[…` 100,000 deep is a RecursionError, an integer of 5,000 digits a
    ValueError (CPython's limit on int()), and the escape "\\ud800" a string that can be neither printed nor saved,
    each a traceback here or later somewhere unrelated. So nesting is measured before parsing, integers are held to
    64 bits, and every string must be characters. The size is the reader's bound (read_user_bytes' limit)."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(_with_fix(f"{where} is not valid JSON (not UTF-8: byte 0x{data[e.start]:02x} at offset "
                                      f"{e.start})", fix)) from None
    else:
        text = data
    if text.count("[") + text.count("{") > MAX_DEPTH:  # else it cannot be too deep: skip the scan
        _check_depth(_JSON_STRING.sub('""', text), where, fix)
    try:
        value = json.loads(text, parse_int=_json_int)
    except _TooWide as e:
        raise UserError(_with_fix(f"{where} holds an integer wider than {MAX_INT_BITS} bits ({e})", fix)) from None
    except json.JSONDecodeError as e:
        raise UserError(_with_fix(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                                  fix)) from None
    # only an escape (or a str given with one already in it) can make a string hold half of a UTF-16 pair
    if ("\\u" in text and _SURROGATE_ESCAPE.search(text)) or (text is data and _SURROGATE.search(text)):
        bad = _find(value, lambda v: isinstance(v, str) and _SURROGATE.search(v) is not None)
        if bad is not None:
            raise UserError(_with_fix(f"{where} holds a lone surrogate escape (half of a UTF-16 pair, not a "
                                      f"character) in {bad}", fix))
    return value


def parse_toml(text: str, where: str, fix: str = "") -> dict:
    """TOML the user wrote (config.toml), with parse_json's bounds, or one UserError line: "WHERE is not valid TOML
    (…); FIX". tomllib accepts integers of any width that it can convert (0x followed by 5,000 digits): the TOML
    specification's 64 bits are held here."""
    def skeleton() -> str:  # strings and comments out, line breaks kept
        return _TOML_SKIPPED.sub(lambda m: "\n" * m.group().count("\n"), text)

    if text.count("[") + text.count("{") > MAX_DEPTH:
        _check_depth(skeleton(), where, fix)
    try:
        value = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(_with_fix(f"{where} is not valid TOML ({e})", fix)) from None
    except ValueError:  # int() refused a decimal integer of more than 4,300 digits
        bare = skeleton()
        long = _LONG_NUMBER.search(bare)
        at = f" at line {bare.count(chr(10), 0, long.start()) + 1}" if long else ""
        raise UserError(_with_fix(f"{where} holds an integer wider than {MAX_INT_BITS} bits{at}", fix)) from None
    wide = _find(value, lambda v: isinstance(v, int) and v.bit_length() > MAX_INT_BITS)
    if wide is not None:
        raise UserError(_with_fix(f"{where} holds an integer wider than {MAX_INT_BITS} bits in {wide}", fix))
    return value


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > 20:  # 2**64 has 20 digits; longer ones are not even converted
        raise _TooWide(f"{digits[:12]}… of {len(digits.lstrip('-')):,} digits")
    value = int(digits)
    if value.bit_length() > MAX_INT_BITS:
        raise _TooWide(digits)
    return value


def _check_depth(skeleton: str, where: str, fix: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH; `skeleton` is the text with its strings and comments taken out (their
    brackets are not structure) and its line breaks kept.

    Fast first (a tokenizer.json has a million brackets): each round removes the innermost pairs, one level, in C.
    What is left after MAX_DEPTH rounds is too deep or unbalanced (broken: the parser names that), and only then is
    it walked bracket by bracket to tell which, and where."""
    brackets = _NOT_BRACKET.sub("", skeleton)
    for _ in range(MAX_DEPTH):
        if not brackets:
            return
        brackets = _INNERMOST.sub("", brackets)
    depth = 0
    for m in _BRACKET.finditer(skeleton):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = skeleton.count("\n", 0, m.start()) + 1
                raise UserError(_with_fix(f"{where} is nested more than {MAX_DEPTH} levels deep (arrays or objects "
                                          f"inside each other, at line {line})", fix))
        else:
            depth -= 1


def _find(value: object, bad: Callable[[object], bool], path: str = "") -> str | None:
    """Where ("turns[3].text") the first key or value for which `bad` is true is in parsed JSON or TOML; None when
    nowhere. A key's surrogates are shown escaped (\\ud800), so that the message itself can be printed."""
    if bad(value):
        return path or "the top level"
    if isinstance(value, dict):
        for key, item in value.items():
            name = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", key)
            here = f"{path}.{name}" if path else name
            found = here if bad(key) else _find(item, bad, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find(item, bad, f"{path}[{i}]")
            if found is not None:
                return found
    return None


# --- how ---------------------------------------------------------------------------------------------------------

def partial_path(target: Path, step: str | None = None) -> Path:
    """The hidden file `target` is written to first; `step` tells apart several for one target (a lowercase word)."""
    return target.parent / f".{target.name}.{os.getpid()}{'.' + step if step else ''}.partial"


@contextmanager
def partial(target: Path, step: str | None = None) -> Iterator[Path]:
    """A partial file for `target`, removed when the block ends whatever happens (rename it into place inside)."""
    path = partial_path(target, step)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, creating its folder; OSError for the caller to explain.

    Never over something that is not a regular file (see check_target): that is an OSError too."""
    kind = not_regular(path)
    if kind:
        raise OSError(errno.EINVAL, f"it is {kind}, not a regular file")
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent)
    with partial(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def sweep(directory: Path, now: float | None = None) -> list[Path]:
    """Remove stale leftovers in `directory`; returns what was removed. Never raises: cleaning up is a courtesy."""
    try:
        candidates = list(directory.iterdir())
    except OSError:
        return []
    now = time.time() if now is None else now
    removed = []
    for path in candidates:
        m = PARTIAL.match(path.name)
        if not m or _running(int(m.group(1))):
            continue
        try:
            if now - path.stat().st_mtime < STALE_SECONDS or not path.is_file():
                continue
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or the platform cannot tell: leave the file alone
        return True
    return True
